"""What operators use: actions (:mod:`.actions`), Dramatiq's Redis layout (:mod:`.redis_layout`), the ``billing ops`` commands (:mod:`.cli`) and the web dashboard (:mod:`.dashboard`)."""
