"""DecDEC runtime: config, op graph, compile, executors, engine, profiler and CLI."""
