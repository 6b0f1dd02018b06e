"""How the toolstack and people control a running device model.

- `server`: the control socket (QMP, `devmodel_wire.control`), many clients,
  none of which can stall the device.
- `commands`: what the socket can be asked (query-*, set-policy, the testing aids, quit...).
- `instance`: the frozen `Instance` commands are given (built once by devmodel/app.py), its
  mutable `Runtime`, and the lender views (built-in or link) behind one small interface.
- `console`: the opt-in Python debug console behind the `python` command.
- `client`: a small blocking client, used by `devmodel attach` and the tests.
- `listing`: `devmodel ls`, every instance under a directory asked at once, each with a deadline
  (its options in `listing_options`, which the command line's parser loads without it).
- `toolstack`: the conventions toolstacks rely on: pidfile, sd_notify, --ready-fd, sockets.
"""
