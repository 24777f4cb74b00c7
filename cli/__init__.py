"""The application shell: the `lmqueue` command line and the one-machine stack (`lmqueue up`).

It wires the three processes together, so it may import every package; nothing imports it
except the benches and tests (which start stacks through `cli.stack`).
"""
