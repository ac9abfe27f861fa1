"""Kafka: clients, topics, worker status, routing views, the lag exporter."""
