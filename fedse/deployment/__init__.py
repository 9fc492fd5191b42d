"""Operations: SuperLink and SuperNode commands, certificates and node keys (:mod:`.deploy`), and
starting and stopping a deployment's processes on one machine (:mod:`.launch`)."""
