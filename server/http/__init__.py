"""The HTTP face of the server: the controller app, guards (auth, limits), schemas, routers and
the connection pool the controller uses toward workers."""
