"""A small edge in network namespaces: clients, an ECMP router, three fronts and two backends."""
