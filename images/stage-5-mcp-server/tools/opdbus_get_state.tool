description: Show the op-dbus state file
