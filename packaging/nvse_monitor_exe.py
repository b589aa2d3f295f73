"""Entry script of the single-file nvse-monitor.exe (PyInstaller; see packaging/build_exe.sh
and README "Windows, without Python")."""

from nvse_monitor.cli import main

if __name__ == "__main__":
    main()
