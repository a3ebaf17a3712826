description: List the services registered on the D-Bus system bus
