"""The measurement beds: the pico and small worlds (aligned chat models and adapters that
broke them), their training, cached artifacts, the demo and the tables they measure. Nothing
in model/, measure/, repair/ or hub/ imports it."""
