"""The Hub CI bot: a webhook receiver that records jobs, a durable queue with job records and
leases (SQLite or Redis), and workers that repair uploaded adapters and open pull requests."""
