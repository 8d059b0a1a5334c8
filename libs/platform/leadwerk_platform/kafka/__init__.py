"""Kafka runtime: client configuration, publisher, consumer loop and topic provisioning."""
