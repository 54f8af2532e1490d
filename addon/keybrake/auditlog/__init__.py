"""The audit log: sinks, the outbox pump, and reports (the one definition of "spent")."""
