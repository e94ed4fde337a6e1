"""Rate limits, connection and slow-client defences, IP access lists, auto-ban, security response headers and
hiding the backends. Everything here is a filter or a small hook; see docs/security.md. (The WAF lives in
bastion/security/waf*.)"""
