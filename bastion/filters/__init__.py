"""Built-in filters. Each is an ordinary filter, written exactly as a user would write one."""
