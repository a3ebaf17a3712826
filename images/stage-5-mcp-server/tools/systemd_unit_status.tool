description: Show the status of a systemd unit
