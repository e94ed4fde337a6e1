"""The WAF's pure parts: settings merging, the generated ModSecurity configuration, log line parsing, CRS
paranoia levels; and the libmodsecurity binding itself on the installed CRS."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bastion.config.schema import Waf, WafExclusion, WafRouteSettings
from bastion.security import waf
from bastion.security.modsecurity import parse_log_line

CRS_RULES = "/usr/share/modsecurity-crs/rules"
BROWSER = [(b"Host", b"example.com"), (b"User-Agent", b"Mozilla/5.0"), (b"Accept", b"text/html")]


def settings(**kw):
    return waf.effective_settings(Waf(**kw), None)


def test_effective_settings_route_overrides_and_inheritance():
    base = Waf(paranoia_level=2, exclusions=[WafExclusion(rule_ids=[920350])])
    s = waf.effective_settings(base, WafRouteSettings(mode="detect", exclusions=[WafExclusion(tags=["attack-xss"])]))
    assert s.mode == "detect" and s.paranoia_level == 2
    assert s.exclusions == ((("920350",), (), None), ((), ("attack-xss",), None))
    assert waf.effective_settings(base, WafRouteSettings.model_validate(False)) is None
    assert waf.effective_settings(Waf(mode="off"), None) is None
    assert waf.effective_settings(None, None) is None
    assert waf.effective_settings(None, WafRouteSettings(exclusions=[WafExclusion(rule_ids=[1])])) is None
    assert waf.effective_settings(None, WafRouteSettings(enabled=True)).mode == "block"
    assert waf.effective_settings(Waf(enabled=False), None) is None
    assert waf.effective_settings(Waf(enabled=False), WafRouteSettings(paranoia_level=3)).paranoia_level == 3


def test_routes_with_equal_engine_settings_share_one_engine_key():
    a = waf.effective_settings(Waf(), WafRouteSettings(body_limit=1000))
    b = waf.effective_settings(Waf(), None)
    assert a.engine_key() == b.engine_key()
    assert waf.effective_settings(Waf(), WafRouteSettings(paranoia_level=2)).engine_key() != b.engine_key()


def test_generated_configuration():
    s = settings(mode="detect", paranoia_level=3, inbound_anomaly_threshold=7, body_limit=1000,
                 exclusions=[WafExclusion(rule_ids=[942100, "920000-920999"]), WafExclusion(tags=["attack-sqli"]),
                             WafExclusion(rule_ids=[941100], tags=["attack-rce"], path="/api/")])
    main = waf.main_config(s)
    assert "SecRuleEngine DetectionOnly" in main and "SecRequestBodyLimit 1000" in main
    assert "SecRuleEngine On" in waf.main_config(settings())
    crs = waf.crs_settings(s)
    assert "setvar:tx.paranoia_level=3" in crs and "setvar:tx.inbound_anomaly_score_threshold=7" in crs
    assert ('SecRule REQUEST_FILENAME "@beginsWith /api/" '
            '"id:1010000,phase:1,pass,nolog,t:none,ctl:ruleRemoveById=941100,ctl:ruleRemoveByTag=attack-rce"') in crs
    removals = waf.removals(s)
    assert "SecRuleRemoveById 942100 920000-920999" in removals
    assert 'SecRuleRemoveByTag "attack-sqli"' in removals
    assert "941100" not in removals  # the path-bound one is a runtime ctl, not a removal everywhere


def test_rule_files_order(tmp_path):
    files = waf.rule_files(settings(extra_rules=["/x/mine.conf"]), str(tmp_path))
    names = [f.rsplit("/", 1)[1] for f in files]
    assert names[:3] == ["bastion-main.conf", "crs-setup.conf", "bastion-crs.conf"]
    assert names[3].startswith("REQUEST-901") or names[3].startswith("REQUEST-9")
    assert names[-2:] == ["mine.conf", "bastion-removals.conf"]


@pytest.mark.parametrize("bad", [{"rule_ids": ["x1"]}, {"rule_ids": ["5-3"]}, {"tags": ["two words"]}, {},
                                 {"rule_ids": [1], "path": "api"}])
def test_bad_exclusions(bad):
    with pytest.raises(ValidationError):
        WafExclusion(**bad)


def test_parse_log_line():
    line = ('ModSecurity: Warning. detected SQLi using libinjection. [file "/r.conf"] [line "46"] [id "942100"] '
            '[rev ""] [msg "SQL Injection Attack Detected via libinjection"] [data "Matched Data: s&1c found within '
            "ARGS:id: 1' or 1=1--\"] [severity \"2\"] [tag \"attack-sqli\"] [tag \"paranoia-level/1\"] [uri \"/\"]")
    m = parse_log_line(line)
    assert m.id == "942100" and m.severity == "2" and m.paranoia_level == 1
    assert m.data.endswith("1' or 1=1--") and m.tags == ["attack-sqli", "paranoia-level/1"]
    assert parse_log_line("no fields here") is None


def test_crs_paranoia_levels():
    levels = waf.crs_paranoia_levels(CRS_RULES)
    assert levels["942100"] == 1 and levels["920200"] == 2 and levels["942421"] == 4


@pytest.fixture(scope="module")
def engine():
    e = waf.load_engine(settings())
    yield e
    e.close()


def test_engine_blocks_an_attack_and_passes_a_clean_request(engine):
    verdict = engine.inspect("10.0.0.1", 5000, "10.0.0.2", 80, b"GET", b"/?id=1%27%20or%201=1--", "1.1", BROWSER, None)
    assert verdict.status == 403
    assert {"942100", "949110"} <= {m.id for m in verdict.matches}
    clean = engine.inspect("10.0.0.1", 5000, "10.0.0.2", 80, b"GET", b"/index.html?page=2", "1.1", BROWSER, None)
    assert clean.status == 0 and clean.matches == []


def test_engine_inspects_bodies(engine):
    headers = BROWSER + [(b"Content-Type", b"application/json"), (b"Content-Length", b"30")]
    body = b'{"q": "<script>alert(1)</script>"}'
    assert engine.inspect("10.0.0.1", 1, "10.0.0.2", 80, b"POST", b"/api", "1.1", headers, body).status == 403
    bad_json = engine.inspect("10.0.0.1", 1, "10.0.0.2", 80, b"POST", b"/api", "1.1", headers, b"{not json")
    assert bad_json.status == 400 and "200002" in {m.id for m in bad_json.matches}


def test_bad_rule_file_is_reported(tmp_path):
    broken = tmp_path / "broken.conf"
    broken.write_text('SecRule ARGS "@rx a" "id:1,phase:1,nosuchaction"\n')
    with pytest.raises(waf.ModSecurityError) as info:
        waf.load_engine(settings(extra_rules=[str(broken)]))
    assert "broken.conf" in str(info.value)
