"""`make bench`: the exchange measured against the floor (cp, nginx) and an Orthanc peer, in one run."""
