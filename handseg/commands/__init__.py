"""One module per subcommand: parse and validate options, call the core, print."""
