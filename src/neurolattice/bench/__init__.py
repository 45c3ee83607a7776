"""Benchmark tools shared by every system: :mod:`.harness` measures, :mod:`.report` prints and writes."""
