"""Everything about the Envoy process: argv, one process per epoch, epochs and backoff, the admin API client."""
