"""The command line: the only place that imports producers, consumers and infra."""
