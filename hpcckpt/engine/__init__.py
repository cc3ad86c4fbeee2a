"""The engine: freeze a process, dump it to an image set, restore it."""
