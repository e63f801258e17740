"""Host networking internals; the public API is `procurator.network`."""
