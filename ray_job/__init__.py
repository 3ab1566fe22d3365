"""The job entrypoint and everything that runs on the driver."""
