"""Agent worker runtime: specs, turns, model client, tools, handoffs."""
