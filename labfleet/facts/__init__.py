"""Facts labfleet reads from hosts, one module per step, each fact with its own small parser
(as pyinfra pairs ``facts/apt.py`` with ``operations/apt.py``)."""
