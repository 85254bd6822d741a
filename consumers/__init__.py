"""Example consumers: the handlers `make demo` and docker-compose.yml run."""
