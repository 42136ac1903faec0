"""Federation: client and server step logic, aggregation, and the rounds loop."""
