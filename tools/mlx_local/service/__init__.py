"""The service: server command line from the config, process control, launchd, systemd, logs."""
