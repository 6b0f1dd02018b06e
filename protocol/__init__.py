"""Sans-IO wire formats and connection state machines. No sockets, no trio, no threads here."""
