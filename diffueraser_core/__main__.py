"""``python -m diffueraser_core {remove,batch,doctor,demo} ...``"""

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m diffueraser_core {remove,batch,doctor,demo} [options]  (--help after a command for details)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "doctor":
        from .doctor import main as doctor_main

        return doctor_main(rest)
    if command == "remove":
        from .cli import main as remove_main

        return remove_main(rest)
    if command == "batch":
        from .batch import main as batch_main

        return batch_main(rest)
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    print(f"unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
