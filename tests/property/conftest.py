"""Fixtures for real-process tests: log services and load writers, stopped by PID."""

from tests.support.logsvc import log_services, writer_procs

__all__ = ["log_services", "writer_procs"]
