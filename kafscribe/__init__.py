"""kafscribe: self-hosted speech-to-text and translation on Kafka, Whisper and Cassandra."""

__version__ = "0.1.0"
