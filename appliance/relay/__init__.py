"""Azure Relay Hybrid Connections: the appliance's only link to the cloud (outbound only)."""
