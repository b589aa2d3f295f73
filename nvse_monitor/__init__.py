"""nvse-monitor: a Frida-based allocation monitor for Fallout New Vegas and NVSE plugins."""

__version__ = "0.2.0"
# Fixed per release so that replaying a recording gives byte-identical files.
BUILD_DATE = "Nov 25 2026 00:00:00"
NAME = "nvse-monitor"
