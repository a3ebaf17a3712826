description: List the registered op-dbus plugins
