"""The double's disk rules at vm.boot (tests/chdouble/disk.py): images opened, typed and locked for real, as
cloud-hypervisor's make_virtio_block_device and Vm::boot do; and its error answers before v47, one text
instead of the JSON array of the chain."""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chdouble import sample_config
from tests.chdouble.disk import QCOW_MAGIC
from tests.chdouble.double import Settings
from tests.unit.test_chdouble import Served, serve

E = "Error from API"
BOOT = [E, "The VM could not boot"]
ENOENT = "No such file or directory (os error 2)"
ENOENT_DEBUG = 'Os { code: 2, kind: NotFound, message: "No such file or directory" }'
LOCKED = [
    *BOOT,
    "Error locking disk images: Another instance likely holds a lock",
    "Cannot lock images of all block devices",
]


@contextlib.contextmanager
def double(tmp_path: Path, release: int = 53, name: str = "a") -> Iterator[Served]:
    root = tmp_path / name
    root.mkdir()
    with serve(root, Settings(poweroff_delay=0.05, no_shutdown=True, release=release)) as served:
        yield served


def create(served: Served, *disks: dict[str, Any], **changes: Any) -> None:
    kernel = served.vm_dir / "kernel"
    kernel.write_bytes(b"not really a kernel")
    config = sample_config(served.vm_dir, kernel)
    config["disks"] = list(disks)
    config.update(changes)
    answer = served.client.put("vm.create", json=config)
    assert answer.status_code == 204, answer.text


def image(path: Path, head: bytes = b"", size: int = 1 << 20) -> Path:
    with path.open("wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def qcow2(path: Path) -> Path:
    return image(path, struct.pack(">I", QCOW_MAGIC))


def write_lock_of(path: Path) -> int:
    """The lock type another open file description of `path` sees (F_OFD_GETLK for a write lock)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, struct.pack("hh4xqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
        return int(struct.unpack_from("h", got)[0])
    finally:
        os.close(fd)


def log(served: Served) -> str:
    stream = served.vmm.log.stream  # the in-process double logs to a StringIO
    return str(stream.getvalue())  # type: ignore[attr-defined]


# --- open --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("release", "tail"),
    [
        (53, ["Cannot open disk path", "I/O error (path={path} op=open)", ENOENT]),
        (52, ["Cannot open disk path", "I/O error (path={path} op=open)", ENOENT]),
        (51, ["Cannot open disk path", ENOENT]),
        (47, ["Cannot open disk path", ENOENT]),
    ],
)
def test_a_missing_disk_image_fails_the_boot_and_the_vm_stays_created(
    tmp_path: Path, release: int, tail: list[str]
) -> None:
    missing = tmp_path / "missing.img"
    with double(tmp_path, release) as served:
        create(served, {"id": "vol-data", "path": str(missing), "readonly": False})
        answer = served.client.put("vm.boot")
        assert answer.status_code == 500
        chain = [*BOOT, "Error from device manager", *(t.format(path=missing) for t in tail)]
        assert answer.json() == chain
        assert served.client.get("vm.info").json()["state"] == "Created"
        image(missing)  # once the image is there, the same VM boots
        assert served.client.put("vm.boot").status_code == 204


def test_a_writable_disk_is_opened_read_write_and_a_readonly_one_read_only(tmp_path: Path) -> None:
    directory = tmp_path / "a-directory"
    directory.mkdir()
    with double(tmp_path) as served:
        # a directory opens read-only but not read-write: the kernel's EISDIR, as for the real binary
        create(served, {"id": "vol-data", "path": str(directory), "readonly": False})
        answer = served.client.put("vm.boot")
        assert answer.json()[-3:] == [
            "Cannot open disk path",
            f"I/O error (path={directory} op=open)",
            "Is a directory (os error 21)",
        ]


@pytest.mark.parametrize(
    ("release", "tail"),
    [
        (53, ["Cannot open disk path", "I/O error (op=detect_image_type)", "failed to fill whole buffer"]),
        (50, ["Failed to parse disk image format", "failed to fill whole buffer"]),
    ],
)
def test_an_image_shorter_than_a_sector_cannot_be_typed(
    tmp_path: Path, release: int, tail: list[str]
) -> None:
    short = tmp_path / "short.img"
    short.write_bytes(b"x" * 100)
    with double(tmp_path, release) as served:
        create(served, {"id": "store", "path": str(short), "readonly": True})
        answer = served.client.put("vm.boot")
        assert answer.json() == [*BOOT, "Error from device manager", *tail]


# --- type detection ----------------------------------------------------------------------------------


def test_from_v51_a_given_image_type_must_match_what_is_detected(tmp_path: Path) -> None:
    disk = {"id": "vol-data", "path": str(qcow2(tmp_path / "q.img")), "readonly": False, "image_type": "Raw"}
    with double(tmp_path, 51) as served:
        create(served, disk)
        answer = served.client.put("vm.boot")
        assert answer.json() == [
            *BOOT,
            "Error from device manager",
            "Disk image type does not match expected type: specified = raw, detected = qcow2",
        ]
    with double(tmp_path, 50, name="b") as served:  # v50 has no image_type: the field is ignored
        create(served, disk)
        assert served.client.put("vm.boot").status_code == 204


@pytest.mark.parametrize("release", [50, 51, 53])
def test_a_disk_without_image_type_is_detected_and_raw_loses_sector_0_from_v51(
    tmp_path: Path, release: int
) -> None:
    raw = image(tmp_path / "raw.img")
    qcow = qcow2(tmp_path / "q.img")
    with double(tmp_path, release) as served:
        create(
            served,
            {"id": "raw", "path": str(raw), "readonly": True},
            {"id": "qcow", "path": str(qcow), "readonly": True},
        )
        assert served.client.put("vm.boot").status_code == 204
        logged = log(served)
        disks = served.client.get("vm.info").json()["config"]["disks"]
    if release < 51:
        assert "image type" not in logged
        assert [d.get("image_type") for d in disks] == [None, None]
        return
    assert logged.count("No image_type specified - detected as") == 2
    assert "Autodetected raw image type. Disabling sector 0 writes." in logged
    assert "Non-raw image type detected." in logged
    assert ("DEPRECATION: auto-detection of disk image type is deprecated" in logged) is (release >= 52)
    assert [d["image_type"] for d in disks] == ["Raw", "Qcow2"]  # "Configuration updated to persist type"


def test_a_raw_disk_with_its_image_type_boots_without_warnings(tmp_path: Path) -> None:
    raw = image(tmp_path / "raw.img")
    with double(tmp_path) as served:
        create(served, {"id": "vol-data", "path": str(raw), "readonly": False, "image_type": "Raw"})
        assert served.client.put("vm.boot").status_code == 204
        assert "WARN" not in log(served)


# --- locks -----------------------------------------------------------------------------------------


def test_from_v46_a_writable_image_is_locked_while_the_vm_exists(tmp_path: Path) -> None:
    volume = image(tmp_path / "data.img")
    disk = {"id": "vol-data", "path": str(volume), "readonly": False, "image_type": "Raw"}
    with double(tmp_path, name="a") as first, double(tmp_path, name="b") as second:
        create(first, disk)
        create(second, disk)
        assert write_lock_of(volume) == fcntl.F_UNLCK  # vm.create opens nothing
        assert first.client.put("vm.boot").status_code == 204
        assert write_lock_of(volume) == fcntl.F_WRLCK

        answer = second.client.put("vm.boot")
        assert answer.status_code == 500
        assert answer.json() == [*LOCKED, f"Failed to get Write lock for disk image: {volume}",
                                 "The file is already locked"]  # fmt: skip
        assert f"Can't get Write lock for {volume} as there is already a ExclusiveWrite lock" in log(second)
        assert second.client.get("vm.info").json()["state"] == "Created"

        assert first.client.put("vm.reboot").status_code == 204  # the new VM takes the lock again
        assert second.client.put("vm.boot").status_code == 500
        assert first.client.put("vm.shutdown").status_code == 204  # the images close: the lock goes
        assert write_lock_of(volume) == fcntl.F_UNLCK
        assert second.client.put("vm.boot").status_code == 204


def test_readonly_images_share_a_read_lock_that_a_writer_cannot_break(tmp_path: Path) -> None:
    store = image(tmp_path / "store.img")
    shared = {"id": "store", "path": str(store), "readonly": True, "image_type": "Raw"}
    with (
        double(tmp_path, name="a") as first,
        double(tmp_path, name="b") as second,
        double(tmp_path, name="c") as writer,
    ):
        for served in (first, second):
            create(served, shared)
            assert served.client.put("vm.boot").status_code == 204
        assert write_lock_of(store) == fcntl.F_RDLCK
        create(writer, {**shared, "id": "vol-data", "readonly": False})
        answer = writer.client.put("vm.boot")
        assert answer.json()[-2:] == [
            f"Failed to get Write lock for disk image: {store}",
            "The file is already locked",
        ]
        assert "there is already a SharedRead lock" in log(writer)


def test_before_v46_images_are_not_locked(tmp_path: Path) -> None:
    volume = image(tmp_path / "data.img")
    disk = {"id": "vol-data", "path": str(volume), "readonly": False}
    with double(tmp_path, 45, name="a") as first, double(tmp_path, 45, name="b") as second:
        for served in (first, second):
            create(served, disk)
            assert served.client.put("vm.boot").status_code == 204
        assert write_lock_of(volume) == fcntl.F_UNLCK


def test_the_lock_is_a_byte_range_from_v52_and_the_whole_file_before(tmp_path: Path) -> None:
    """v52's default LockGranularityChoice::ByteRange locks [0, size): a lock past the end does not
    conflict; v46-v51 lock the whole file (l_len 0), so it does."""
    for release, refused in ((53, False), (51, True)):
        volume = image(tmp_path / f"data-{release}.img", size=1 << 16)
        fd = os.open(volume, os.O_RDWR)
        try:
            beyond = struct.pack("hh4xqqi4x", fcntl.F_WRLCK, 0, 1 << 20, 4096, 0)
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, beyond)  # someone holds a lock far past the image's end
            with double(tmp_path, release, name=f"r{release}") as served:
                create(served, {"id": "vol-data", "path": str(volume), "readonly": False})
                assert (served.client.put("vm.boot").status_code == 500) is refused
        finally:
            os.close(fd)


# --- error answers before v47 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("release", "body"),
    [
        (45, "VM is not created"),
        (46, "Error from API: The VM info is not available: VM is not created"),
    ],
)
def test_errors_before_v47_are_one_text(tmp_path: Path, release: int, body: str) -> None:
    with double(tmp_path, release) as served:
        answer = served.client.get("vm.info")
        assert (answer.status_code, answer.text) == (404, body)


@pytest.mark.parametrize(
    ("release", "body"),
    [
        (45, "Error from device manager: Disk(" + ENOENT_DEBUG + ")"),
        (46, "Error from API: The VM could not boot: Error from device manager: Disk(" + ENOENT_DEBUG + ")"),
    ],
)
def test_a_device_error_before_v47_shows_its_debug_form(tmp_path: Path, release: int, body: str) -> None:
    with double(tmp_path, release) as served:
        create(served, {"id": "vol-data", "path": str(tmp_path / "missing.img"), "readonly": False})
        answer = served.client.put("vm.boot")
        assert (answer.status_code, answer.text) == (500, body)


def test_a_pause_error_before_v47_embeds_its_sources(tmp_path: Path) -> None:
    with double(tmp_path, 45) as served:
        create(served, {"id": "store", "path": str(image(tmp_path / "s.img")), "readonly": True})
        assert served.client.put("vm.boot").status_code == 204
        assert served.client.put("vm.pause").status_code == 204
        answer = served.client.put("vm.pause")
        assert answer.text == (
            "Cannot pause VM: Failed to pause migratable component: "
            "invalid VM state transition: Paused to Paused"
        )


def test_v46_locking_error_text_names_no_cause(tmp_path: Path) -> None:
    volume = image(tmp_path / "data.img")
    disk = {"id": "vol-data", "path": str(volume), "readonly": False}
    with double(tmp_path, 46, name="a") as first, double(tmp_path, 46, name="b") as second:
        create(first, disk)
        create(second, disk)
        assert first.client.put("vm.boot").status_code == 204
        answer = second.client.put("vm.boot")
        assert answer.text == (
            "Error from API: The VM could not boot: "
            "Error locking disk images: Another instance likely holds a lock"
        )


# --- the Socket console ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("release", "at", "body"),
    [
        (40, "vm.boot", "Error from device manager: NoSocketOptionSupportForConsoleDevice"),
        (41, "vm.boot", "Error from device manager: NoSocketOptionSupportForConsoleDevice"),
        (45, "vm.create", "Error creating console devices"),
        (46, "vm.create", "Error from API: The VM could not be created: Error creating console devices"),
    ],
)
def test_a_socket_console_is_refused_at_create_from_v42_and_at_boot_before(
    tmp_path: Path, release: int, at: str, body: str
) -> None:
    with double(tmp_path, release) as served:
        kernel = served.vm_dir / "kernel"
        kernel.write_bytes(b"not really a kernel")
        config = sample_config(served.vm_dir, kernel)
        config["console"] = {"mode": "Socket", "socket": str(served.vm_dir / "console.sock")}
        answer = served.client.put("vm.create", json=config)
        if at == "vm.boot":
            assert answer.status_code == 204
            answer = served.client.put("vm.boot")
        assert (answer.status_code, answer.text) == (500, body)


def test_a_validation_error_before_v47_embeds_its_rule(tmp_path: Path) -> None:
    with double(tmp_path, 45) as served:
        create(served, cpus={"boot_vcpus": 2, "max_vcpus": 1})
        answer = served.client.put("vm.boot")
        assert (answer.status_code, answer.text) == (
            500,
            "Failed to validate config: Max CPUs lower than boot CPUs",
        )
