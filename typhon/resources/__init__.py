"""Resources: CPU sets, worker pools and their concurrency caps."""

from typhon.resources._cpuset import format_cpuset, parse_cpuset

__all__ = ["format_cpuset", "parse_cpuset"]
