"""Where the functions run: the server, the container entry point, Lambda, logging, memory."""
