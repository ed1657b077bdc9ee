"""The admin API (``{base_path}/admin/api/v1/``): clients, providers, routes, usage, the request log, the
configuration and the encryption key, managed while the gateway runs. :mod:`.api` is the door."""
