"""The read side: queries that several parts use (gateway, routing, audit), on tables each written by one
consumer group. Nothing here writes."""
