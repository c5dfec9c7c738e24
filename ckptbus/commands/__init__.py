"""The ``ckptbus`` subcommands: each module gives ``<name>_command_parser(subparsers)`` and ``<name>_command(args)``."""
