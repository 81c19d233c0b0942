"""The operators' commands: db init/upgrade now; status, audit and why to follow."""
