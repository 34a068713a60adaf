"""The device end of the MQTT link: session, topics, commands. Knows nothing of the agent."""
