"""Running the legacy processor: one contract (`Processor`), two transports.

`exec` spawns the command in the worker's container (`child` starts it off the event loop);
`fastcgi` asks the php-fpm sidecar's runner to do the same, over the codec in `fastcgi_codec`.
"""
