"""The daemon: the supervisor that starts and restarts the stages' workers, starting and
stopping it (control), its systemd unit, and the live feed behind `picosnitch top`."""
