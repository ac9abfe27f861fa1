"""Local infrastructure: fetch and run Kafka and Cassandra, bootstrap topics and tables."""
