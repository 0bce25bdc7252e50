"""One module per `lvd` subcommand; each exposes `register(subparsers)`."""
