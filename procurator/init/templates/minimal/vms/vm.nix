# The VM {{ vm }}: the minimal builder's guest (busybox), serving a page on port 80 and /health, which
# the host checks before it replaces a running generation. The fields: docs/bundle.md.
{
  name = "{{ vm }}";
  vcpus = 1;
  memoryMiB = 192;
  health = [
    {
      type = "http";
      port = 80;
      path = "/health";
    }
  ];
  restart = {
    policy = "always";
  };
}
