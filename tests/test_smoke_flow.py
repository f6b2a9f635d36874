def test_conversion_login_keeps_the_anonymous_mpid(idsync):
    client = idsync({"strategy": "profile_conversion"})
    anonymous = client.identify({"ios_idfv": "9876"})
    known = client.login({"customerid": "ABC123", "email": "ed@example.com", "ios_idfv": "9876"})
    assert known["mpid"] == anonymous["mpid"]
    assert known["is_logged_in"] is True and anonymous["is_logged_in"] is False
