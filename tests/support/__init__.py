"""Test harness: real nats-server processes, subprocess services, a fake OpenAI server."""
