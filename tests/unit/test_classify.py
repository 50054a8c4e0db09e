"""Reply classification: published provider replies, precedence, fallbacks, failures, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

from axiom.cli import app
from relay.delivery import classify as classify_module
from relay.delivery.classify import (
    ACTIONS,
    CATEGORIES,
    CLASSIFICATION_FILE,
    FAILURE_KINDS,
    NO_RULE,
    PROVIDERS_FILE,
    UNPARSEABLE,
    ConnectionFailure,
    Reply,
    ReplyParseError,
    classify,
    load_rules,
    parse_reply,
    provider_for_mx,
    read_reply,
    rules,
    split_replies,
)
from runbooks.loader import RunbookError, load_all, load_file
from tests.examples import examples

IP = "192.0.2.10"

# (provider, reply, category, permanent, action) - texts from the deliverability fact sheet
# (§2.3-2.9), i.e. the providers' published error pages, Sisimai and KumoMTA rule sets.
# One reply per row reads better than ruff's five-line tuples.
# fmt: off
PUBLISHED = [
    # --- Google
    ("google", f"421-4.7.28 [{IP}      15] Gmail has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited. For more information, go to\n421 4.7.28  https://support.google.com/mail/?p=UnsolicitedRateLimitError to review our Bulk Email Senders Guidelines. a1-20020a - gsmtp", "rate_limited", False, "suspend_path"),
    ("google", "421 4.7.28 Gmail has detected an unusual rate of mail originating from your DKIM domain [example.com      15]. - gsmtp", "rate_limited", False, "suspend_path"),
    ("google", "550 5.7.28 There is an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been blocked. - gsmtp", "reputation", True, "suspend_path"),
    ("google", "421 4.7.28 Gmail has detected that this message exceeded the quota for sending messages that have the same Message-ID. - gsmtp", "rate_limited", False, "investigate"),
    ("google", f"421 4.7.0 [{IP}] Our system has detected that this message is suspicious due to the very low reputation of the sending IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited. - gsmtp", "reputation", False, "throttle_path"),
    ("google", f"550 5.7.1 [{IP}] Our system has detected that this message is likely suspicious due to the very low reputation of the sending domain. To best protect our users from spam, the message has been blocked. - gsmtp", "reputation", True, "suspend_path"),
    ("google", f"421 4.7.0 [{IP}] Our system has detected that this message is suspicious due to the nature of the content or the links within. - gsmtp", "content", False, "check_content"),
    ("google", f"550 5.7.1 [{IP}] Our system has detected that this message is likely unsolicited mail. To reduce the amount of spam sent to Gmail, this message has been blocked. - gsmtp", "content", True, "check_content"),
    ("google", f"550 5.7.25 [{IP}] The IP address sending this message does not have a PTR record setup, or the corresponding forward DNS entry does not point to the sending IP. - gsmtp", "rdns", True, "check_rdns"),
    ("google", "451 4.7.23 The sending IP address for this message doesn't have a PTR record, or the PTR record's forward DNS entry doesn't match the sending IP address. - gsmtp", "rdns", False, "check_rdns"),
    ("google", "550 5.7.26 This mail has been blocked because the sender is unauthenticated. Gmail requires all senders to authenticate with either SPF or DKIM. - gsmtp", "authentication", True, "check_authentication"),
    ("google", "550 5.7.26 Unauthenticated email from example.com is not accepted due to domain's DMARC policy. Please contact the administrator of example.com domain. - gsmtp", "authentication", True, "check_authentication"),
    ("google", "421 4.7.26 This mail has been rate limited because it is unauthenticated. - gsmtp", "authentication", False, "check_authentication"),
    ("google", "451 4.7.26 Unauthenticated email from example.com is not accepted due to domain's DMARC policy, but temporary DNS failures prevent authentication. - gsmtp", "transient", False, "retry"),
    ("google", f"550 5.7.26 The MAIL FROM domain [example.com] has an SPF record with a hard fail policy (-all) but it fails to pass SPF checks with the ip: [{IP}]. - gsmtp", "authentication", True, "check_authentication"),
    ("google", "421 4.7.27 Your email has been rate limited because SPF authentication didn't pass for this message. - gsmtp", "authentication", False, "check_authentication"),
    ("google", "550 5.7.30 Your email has been blocked because DKIM authentication didn't pass for this message. - gsmtp", "authentication", True, "check_authentication"),
    ("google", "421 4.7.32 Your email has been rate limited because the From: header (RFC5322) in this message isn't aligned with either the authenticated SPF or DKIM organizational domain. - gsmtp", "authentication", False, "check_authentication"),
    ("google", "421 4.7.29 Your email has been rate limited because this message wasn't sent over a TLS connection. - gsmtp", "tls", False, "check_tls"),
    ("google", "421 4.7.0 TLS required for RCPT domain, closing connection. - gsmtp", "tls", False, "check_tls"),
    ("google", "450 4.2.1 The user you are trying to contact is receiving mail too quickly. Please resend your message at a later time. - gsmtp", "rate_limited", False, "retry"),
    ("google", "452 4.2.2 The recipient's inbox is out of storage space. Please direct the recipient to https://support.google.com/mail/?p=OverQuotaTemp - gsmtp", "mailbox_full", False, "retry"),
    ("google", "552 5.2.2 The recipient's inbox is out of storage space and inactive. Please direct the recipient to https://support.google.com/mail/?p=OverQuotaPerm - gsmtp", "mailbox_disabled", True, "suppress_recipient"),
    ("google", "550 5.2.1 The email account that you tried to reach is inactive. - gsmtp", "mailbox_disabled", True, "suppress_recipient"),
    ("google", "550 5.1.1 The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos. - gsmtp", "mailbox_unknown", True, "suppress_recipient"),
    ("google", "452 4.5.3 Your message has too many recipients. - gsmtp", "policy", False, "split_message"),
    ("google", "552 5.3.4 Your message exceeded Google's message size limits. - gsmtp", "message_too_large", True, "none"),
    ("google", f"550 5.7.1 [{IP}] Messages missing a valid Message-ID header are not accepted. - gsmtp", "content", True, "check_content"),
    ("google", "250 2.0.0 OK  1712345678 a1-20020a05 - gsmtp", "delivered", False, "none"),
    # --- Microsoft
    ("microsoft", f"550 5.7.1 Unfortunately, messages from [{IP}] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150). You can also refer your provider to http://mail.live.com/mail/troubleshooting.aspx#errors.", "blocklisted", True, "suspend_path"),
    ("microsoft", f"550 5.7.1 Unfortunately, messages from [{IP}] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3140).", "blocklisted", True, "suspend_path"),
    ("microsoft", f"421 RP-001 (BAY004-MC5F17) Unfortunately, some messages from {IP} weren't sent. Please try again. The mail server IP connecting to Outlook.com server has exceeded the rate limit allowed.", "rate_limited", False, "throttle_path"),
    ("microsoft", f"421 RP-002 (BAY004-MC5F17) Unfortunately, some messages from {IP} weren't sent. Please try again.", "rate_limited", False, "throttle_path"),
    ("microsoft", f"421 RP-003 (BAY004-MC5F17) The mail server IP connecting to Outlook.com server has exceeded the connection limit allowed. {IP}", "rate_limited", False, "throttle_path"),
    ("microsoft", f"451 4.7.650 The mail server [{IP}] has been temporarily rate limited due to IP reputation. For e-mail delivery information, see https://postmaster.live.com (S775)", "reputation", False, "throttle_path"),
    ("microsoft", f"451 4.7.651 The mail server [{IP}] has been temporarily rate limited due to IP reputation. For e-mail delivery information, see https://postmaster.live.com (S844)", "reputation", False, "throttle_path"),
    ("microsoft", f"451 4.7.500 Server busy. Please try again later from [{IP}]. (AS77712344) [BN1NAM02FT015.eop-nam02.prod.protection.outlook.com]", "rate_limited", False, "throttle_path"),
    ("microsoft", f"451 4.7.652 The mail server [{IP}] has exceeded the maximum number of connections. (S3115)", "rate_limited", False, "throttle_path"),
    ("microsoft", f"550 5.7.606 Access denied, banned sending IP [{IP}]. To request removal from this list please visit https://sender.office.com/ and follow the directions. (AS16012609)", "blocklisted", True, "suspend_path"),
    ("microsoft", f"550 5.7.511 Access denied, banned sender[{IP}]. To request removal from this list please forward this message to delist@messaging.microsoft.com.", "blocklisted", True, "suspend_path"),
    ("microsoft", "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP. For more information please go to http://go.microsoft.com/fwlink/?LinkId=526653 AS(7)", "reputation", True, "suspend_path"),
    ("microsoft", f"550 5.7.1 Service unavailable, Client host [{IP}] blocked using Spamhaus. To request removal from this list see https://www.spamhaus.org/query/ip/{IP} (AS16012611)", "blocklisted", True, "suspend_path"),
    ("microsoft", "550 5.7.1 Helo domain is listed in Spamhaus (S8001)", "blocklisted", True, "suspend_path"),
    ("microsoft", "550 5.7.515 Access denied, sending domain example.com does not meet the required authentication level.", "authentication", True, "check_authentication"),
    ("microsoft", "550 5.7.509 Access denied, sending domain example.com does not pass DMARC verification and has a DMARC policy of reject.", "authentication", True, "check_authentication"),
    ("microsoft", "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup", "mailbox_unknown", True, "suppress_recipient"),
    ("microsoft", "550 5.5.0 Requested action not taken: mailbox unavailable", "mailbox_unknown", True, "suppress_recipient"),
    ("microsoft", "451 4.7.0 Temporary server error. Please try again later. PRX4 [AM0PR01MB1234.eurprd01.prod.exchangelabs.com]", "transient", False, "retry"),
    ("microsoft", f"550 SC-001 (BAY004-MC1F33) Unfortunately, messages from {IP} weren't sent. Outlook.com rejected the messages due to policy reasons.", "reputation", True, "suspend_path"),
    ("microsoft", "550 5.7.513 Service unavailable, Client host [192.0.2.10] blocked by example.org using Customer Block list (AS16012607)", "policy", True, "investigate"),
    # --- Yahoo / AOL
    ("yahoo", f"421 4.7.0 [TSS04] Messages from {IP} temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes", "reputation", False, "suspend_path"),
    ("yahoo", f"553 5.7.2 [TSS09] All messages from {IP} will be permanently deferred; Retrying will NOT succeed. See https://postmaster.yahooinc.com/error-codes", "reputation", True, "suspend_path"),
    ("yahoo", f"421 4.7.0 [TS01] Messages from {IP} temporarily deferred due to user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes", "reputation", False, "throttle_path"),
    ("yahoo", "421 4.7.0 [TS02] We're seeing unusual traffic patterns from your server. Submit your sending IPs for review.", "rate_limited", False, "throttle_path"),
    ("yahoo", "421 4.7.0 [TS03] We're seeing unusual traffic patterns from your server.", "rate_limited", False, "throttle_path"),
    ("yahoo", f"421 [IPTS04] Messages from {IP} temporarily deferred due to unexpected volume or user complaints", "reputation", False, "suspend_path"),
    ("yahoo", f"553 5.7.1 [BL21] Connections will not be accepted from {IP}, because the ip is in Spamhaus's list; see https://postmaster.yahooinc.com/error-codes", "blocklisted", True, "suspend_path"),
    ("yahoo", "553 5.7.1 [BL23] Connections not accepted from IP addresses on Spamhaus XBL; see https://postmaster.yahooinc.com/error-codes", "blocklisted", True, "suspend_path"),
    ("yahoo", "554 5.7.9 Message not accepted for policy reasons.  See https://postmaster.yahooinc.com/error-codes", "content", True, "check_content"),
    ("yahoo", "550 5.7.9 This mail has been blocked because the sender is unauthenticated. Yahoo requires all senders to authenticate with either SPF or DKIM.", "authentication", True, "check_authentication"),
    ("yahoo", "554 delivery error: dd This user doesn't have a yahoo.com account (someone@yahoo.com) [0] - mta1012.mail.gq1.yahoo.com", "mailbox_unknown", True, "suppress_recipient"),
    ("yahoo", "554 delivery error: dd Sorry your message to someone@yahoo.com cannot be delivered. This mailbox is disabled (554.30). - mta1012.mail.gq1.yahoo.com", "mailbox_disabled", True, "suppress_recipient"),
    ("yahoo", "552 1 Requested mail action aborted, mailbox not found", "mailbox_unknown", True, "suppress_recipient"),
    ("yahoo", "421 Max message per connection reached, closing transmission channel", "rate_limited", False, "throttle_path"),
    ("yahoo", "451 Message temporarily deferred due to unresolvable RFC.5321 from domain; see https://postmaster.yahooinc.com/error-codes", "authentication", False, "check_authentication"),
    # --- Apple iCloud
    ("apple", "421 4.7.1 Messages to someone@icloud.com deferred due to excessive volume. Try again later.", "rate_limited", False, "throttle_path"),
    ("apple", f"421 [HCM1] Your mail from {IP} was deferred. Please try again later.", "reputation", False, "suspend_path"),
    ("apple", "451 [BS02] Temporary server error. Please try again later.", "transient", False, "retry"),
    ("apple", "554 5.7.1 [HME1] This message was blocked for failing both SPF and DKIM authentication checks.", "authentication", True, "check_authentication"),
    ("apple", "554 5.7.1 Your message was rejected due to example.com's DMARC policy.", "authentication", True, "check_authentication"),
    ("apple", "550 5.7.1 Your email was rejected due to having a domain present in the Spamhaus DBL -- see https://www.spamhaus.org/dbl/", "blocklisted", True, "suspend_path"),
    ("apple", f"550 5.7.0 Blocked - see https://support.proofpoint.com/dnsbl-lookup.cgi?ip={IP}", "blocklisted", True, "suspend_path"),
    ("apple", "550 5.7.1 [CS01] Message rejected due to local policy. Please visit https://support.apple.com/en-us/HT204137", "policy", True, "check_content"),
    ("apple", "550 5.7.1 message content rejected due to spam", "content", True, "check_content"),
    ("apple", "550 5.1.1 <someone@icloud.com>: inactive email address", "mailbox_disabled", True, "suppress_recipient"),
    ("apple", "550 5.1.1 <someone@icloud.com>: user does not exist", "mailbox_unknown", True, "suppress_recipient"),
    ("apple", "552 5.2.2 <someone@icloud.com>: user is over quota", "mailbox_full", False, "retry"),
    # --- Comcast
    ("comcast", f"554 5.7.1 {IP} has been blocked. Please see https://postmaster.comcast.net/smtp-error-codes.php#BL000001", "blocklisted", True, "suspend_path"),
    ("comcast", f"421 4.1.0 {IP} throttled. Please see https://postmaster.comcast.net/smtp-error-codes.php#RL000001", "rate_limited", False, "throttle_path"),
    ("comcast", f"554 5.7.1 {IP} dynamic or residential IP space. Please see https://postmaster.comcast.net/smtp-error-codes.php#ES000010", "rdns", True, "check_rdns"),
    ("comcast", "550 5.1.1 someone@comcast.net Account Closed, Please Remove", "mailbox_disabled", True, "suppress_recipient"),
    ("comcast", "421 Too many sessions opened", "rate_limited", False, "throttle_path"),
    ("comcast", "421 Reverse DNS failure : Try again later", "rdns", False, "check_rdns"),
    # --- GMX / WEB.DE
    ("gmx", "421-Reject due to policy restrictions.\n421 Too many messages have been received in a short period of time. Please reduce the sending rate. For explanation visit https://postmaster.gmx.net/en/case?c=r0301", "rate_limited", False, "throttle_path"),
    ("gmx", f"554-IP address is block listed.\n554 For explanation visit https://postmaster.gmx.net/en/case?c=r0201&i=ip&v={IP}&r=1ABCD", "blocklisted", True, "suspend_path"),
    ("gmx", "550 Reject due to SPF policy", "authentication", True, "check_authentication"),
    ("gmx", "421 Reject due to policy violations", "reputation", False, "suspend_path"),
    ("gmx", "554-Transaction failed\n554 Reject due to policy restrictions.", "policy", True, "suspend_path"),
    # --- Orange
    ("orange", "550 5.7.1 Service refuse. Veuillez essayer plus tard. Service refused, please try later. OFR004_103 [103]", "reputation", True, "suspend_path"),
    ("orange", "421 mwinf5c17 ME Trop de connexions, veuillez verifier votre configuration. Too many connections, slow down. OFR005_104 [104]", "rate_limited", False, "throttle_path"),
    ("orange", f"550 5.7.1 Client host blocked for spamming issues. OFR006_102 Ref http://csi.cloudmark.com/reset-request/?ip={IP}", "blocklisted", True, "suspend_path"),
    ("orange", "501 5.0.2 <sender@example.com>: Mail rejected. DMARC check failed.", "authentication", True, "check_authentication"),
    ("orange", "550 5.1.1 Adresse d au moins un destinataire invalide. Invalid recipient. OFR_416 [416]", "mailbox_unknown", True, "suppress_recipient"),
    ("orange", "552 5.1.1 Boite du destinataire pleine. Recipient overquota. OFR_417 [417]", "mailbox_full", False, "retry"),
    # --- generic receivers (DNSBLs, Postfix, RFC texts)
    ("generic", f"554 5.7.1 Service unavailable; Client host [{IP}] blocked using zen.spamhaus.org; https://www.spamhaus.org/query/ip/{IP}", "blocklisted", True, "suspend_path"),
    ("generic", f"554 5.7.1 Service unavailable; Client host [{IP}] blocked using b.barracudacentral.org; http://www.barracudanetworks.com/reputation/?pr=1&ip={IP}", "blocklisted", True, "suspend_path"),
    ("generic", f"550 5.7.1 Rejected: {IP} is listed at bl.spamcop.net", "blocklisted", True, "suspend_path"),
    ("generic", "550 5.1.1 <x@example.org>: Recipient address rejected: User unknown in virtual mailbox table", "mailbox_unknown", True, "suppress_recipient"),
    ("generic", "552 Mailbox full", "mailbox_full", False, "retry"),
    ("generic", "550 5.2.1 <x@example.org>: account disabled", "mailbox_disabled", True, "suppress_recipient"),
    ("generic", "450 4.2.0 <x@example.org>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/example.org.html", "transient", False, "retry"),
    ("generic", f"450 4.7.1 Client host rejected: cannot find your reverse hostname, [{IP}]", "rdns", False, "check_rdns"),
    ("generic", "554 5.7.1 Message rejected as spam", "content", True, "check_content"),
    ("generic", "552 5.3.4 Message size exceeds fixed maximum message size", "message_too_large", True, "none"),
    ("generic", "550 5.7.1 <sender@example.com>: Sender address rejected: Domain not found", "authentication", True, "check_authentication"),
]
# fmt: on


@pytest.mark.parametrize(("provider", "reply", "category", "permanent", "action"), PUBLISHED)
def test_published_replies(provider, reply, category, permanent, action):
    result = classify(reply, provider)
    assert (result.category, result.permanent, result.action) == (category, permanent, action), (
        result.rule_id
    )
    assert result.provider == provider
    assert result.code == int(reply[:3])


def test_the_table_covers_every_provider_and_most_categories():
    providers = {row[0] for row in PUBLISHED}
    assert providers == {p for _, p in rules().mx_suffixes} | {"generic"}
    assert len(PUBLISHED) >= 40
    assert {row[2] for row in PUBLISHED} >= set(CATEGORIES) - {"unknown", "bad_domain"}


# --------------------------------------------------------------------------- precedence
@pytest.mark.parametrize(
    ("reply", "provider", "provider_rule", "generic_rule", "generic_category"),
    [
        (
            "552 5.2.2 The recipient's inbox is out of storage space and inactive. - gsmtp",
            "google",
            "google-storage-inactive",
            "text-mailbox-full",
            "mailbox_full",
        ),
        (
            f"421 4.7.0 [TSS04] Messages from {IP} temporarily deferred due to unexpected "
            "volume or user complaints",
            "yahoo",
            "yahoo-tss04",
            "text-reputation-deferred",
            "reputation",
        ),
        (
            "550 5.7.513 Service unavailable, Client host [192.0.2.10] blocked by example.org "
            "using Customer Block list (AS16012607)",
            "microsoft",
            "microsoft-customer-block-list",
            "text-blocklisted",
            "blocklisted",
        ),
        (
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; not found by SMTP address lookup",
            "microsoft",
            "enhanced-x.1.10-rejected",  # no Microsoft text: the registry meaning holds
            "enhanced-x.1.10-rejected",
            "bad_domain",
        ),
    ],
)
def test_provider_rules_come_before_generic_ones(
    reply, provider, provider_rule, generic_rule, generic_category
):
    assert classify(reply, provider).rule_id == provider_rule
    generic = classify(reply, "generic")
    assert (generic.rule_id, generic.category) == (generic_rule, generic_category)


@pytest.mark.parametrize(
    ("reply", "category", "rule_id"),
    [
        # a specific enhanced code says more than a generic word in its text
        (
            "550 5.7.23 The message was rejected because of Sender Policy Framework violation",
            "authentication",
            "text-authentication",
        ),
        ("550 5.1.1 <x@example.org>: not permitted", "mailbox_unknown", "enhanced-x.1.1-rejected"),
        ("550 5.7.26 policy says no", "authentication", "enhanced-x.7.26-27"),
        # ... and the generic words still decide where no code does
        ("554 Denied by policy", "policy", "text-policy"),
        ("550 relay not permitted", "policy", "text-policy"),
        # a recipient refused for no stated reason is unknown; with a reason, the reason decides
        (
            "550 <x@example.org>: Recipient address rejected.",
            "mailbox_unknown",
            "text-recipient-rejected",
        ),
        (
            "550 <x@example.org>: Recipient address rejected: Policy violation",
            "policy",
            "text-policy",
        ),
        (
            "550 5.7.1 <x@example.org>: Recipient address rejected",
            "policy",
            "enhanced-x.7.1-rejected",
        ),
        (
            "501 5.1.8 <s@example.com>: Sender address rejected",
            "authentication",
            "text-sender-rejected",
        ),
        # too many invalid recipients is a verdict on the sender: the recipient is not unknown
        ("550 too many invalid recipients", "reputation", "text-client-refused"),
        # the stage the wrapper names: refused at MAIL FROM concerns our reverse-path
        (
            "SMTP error from remote mail server after MAIL FROM:<s@example.com> SIZE=1024: host mx.example.org [192.0.2.1]: 550 Go away",
            "authentication",
            "text-rejected-at-mail-from",
        ),
        # ... and nothing refused at MAIL FROM suppresses a recipient: none was named yet
        (
            "SMTP error from remote mail server after MAIL FROM:<s@example.com>: host mx.example.org [192.0.2.1]: 550 Unroutable sender address",
            "authentication",
            "text-rejected-at-mail-from",
        ),
        (
            "host mx.example.org[192.0.2.1] said: 550 5.1.7 No such domain example.com (in reply to MAIL FROM command)",
            "authentication",
            "text-rejected-at-mail-from",
        ),
        ("550 Unroutable address", "bad_domain", "text-bad-domain"),
        # the wrapper's numbers are not the reply's code ("SIZE=222:")
        (
            "SMTP error from remote mail server after RCPT TO:<x@example.org> SIZE=222: host mx.example.org [192.0.2.1]: 550 Mailbox ( x@example.org ) not found",
            "mailbox_unknown",
            "text-mailbox-unknown",
        ),
        ("554 5.6.0 Message with invalid header rejected", "content", "text-malformed"),
        ("554 Duplicate header 'DKIM-Signature'", "content", "text-malformed"),
        ("554 5.4.6 Too many hops", "transient", "enhanced-x.4.6"),
        ("554 Too many hops", "transient", "text-mail-loop"),
        ("550 System incorrectly configured", "transient", "text-receiver-error"),
    ],
)
def test_generic_rules_and_their_precedence(reply, category, rule_id):
    result = classify(read_reply(reply), "generic")
    assert (result.category, result.rule_id) == (category, rule_id)


@pytest.mark.parametrize(
    ("reply", "category", "rule_id", "permanent"),
    [
        # how receivers write an unknown recipient
        (
            "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found",
            "mailbox_unknown",
            "text-mailbox-unknown",
            True,
        ),
        ("550 Invalid address: <x@example.org>", "mailbox_unknown", "text-mailbox-unknown", True),
        (
            "550 unknown local-part 'x' in domain example.org",
            "mailbox_unknown",
            "text-mailbox-unknown",
            True,
        ),
        ("550 No such person at this address", "mailbox_unknown", "text-mailbox-unknown", True),
        (
            "550 Account x@example.org does not exist",
            "mailbox_unknown",
            "text-mailbox-unknown",
            True,
        ),
        (
            "550 Sorry, x@example.org does not have an account here",
            "mailbox_unknown",
            "text-mailbox-unknown",
            True,
        ),
        ("550 Bad recipient <x@example.org>", "mailbox_unknown", "text-mailbox-unknown", True),
        ("550 Recipient verify failed", "mailbox_unknown", "text-mailbox-unknown", True),
        # ... but not a syntax complaint, nor a reply the wrapper says was to MAIL FROM
        ("550 bad address syntax", "unknown", "code-5xx", True),
        (
            "SMTP error from remote mail server after MAIL FROM:<s@example.com>: 550 Invalid address",
            "authentication",
            "text-rejected-at-mail-from",
            True,
        ),
        # X.1.7 / X.1.8 are about our sender (RFC 3463), whatever words follow: no one suppressed
        ("550 5.1.7 Invalid address", "authentication", "enhanced-x.1.7-8", True),
        (
            "553 5.1.8 <s@example.com>... Domain of sender address does not exist",
            "authentication",
            "text-sender-rejected",
            True,
        ),
        ("550 5.1.8 Mailbox unavailable", "authentication", "enhanced-x.1.7-8", True),
        # Amazon SES's wrapper says "Unknown address error" about whatever it quotes
        (
            "550 5.1.0 - Unknown address error '5.7.1 <x@example.org>... Access denied' (delivery attempts: 0)",
            "policy",
            "text-policy",
            True,
        ),
        ("550 <x@example.org> is now disabled", "mailbox_disabled", "text-mailbox-disabled", True),
        (
            "452 4.2.1 Mailbox temporarily disabled: x@example.org",
            "mailbox_disabled",
            "text-mailbox-disabled-deferred",
            False,
        ),
        ("452 Not enough disk space", "mailbox_full", "text-mailbox-full", False),
        # SPF, DKIM and DMARC as receivers word them
        (
            "550 5.7.1 Rejected: domain of example.com does not designate 192.0.2.1 as permitted sender",
            "authentication",
            "text-authentication",
            True,
        ),
        (
            "550 192.0.2.1 is not allowed to send mail from example.com",
            "authentication",
            "text-authentication",
            True,
        ),
        (
            "554 MAIL FROM <s@example.com> mismatches client IP 192.0.2.1",
            "authentication",
            "text-authentication",
            True,
        ),
        (
            "550 From: header domain not aligned with the DKIM signing domain",
            "authentication",
            "text-authentication",
            True,
        ),
        # block lists by name or by DNS zone; URI lists are about the message, not the IP
        ("554 Client 192.0.2.1 listed in bl.example.net", "blocklisted", "text-blocklisted", True),
        ("554 Rejected: see dnsbl.sorbs.net", "blocklisted", "text-blocklisted", True),
        (
            "554 5.7.1 Message rejected: a URL in it is listed in multi.surbl.org",
            "content",
            "text-uri-blocklisted",
            True,
        ),
        # a guess at a listing names no list: it suspends nothing
        (
            "550 The account or domain may not exist, they may be blacklisted",
            "mailbox_unknown",
            "text-mailbox-unknown",
            True,
        ),
        # the receiver's own refusal of our IP or host, no list named: reputation, not blocklisted
        (
            "554 5.7.1 <unknown[192.0.2.1]>: Client host rejected: Access denied",
            "reputation",
            "text-client-refused",
            True,
        ),
        (
            "550 Your IP address 192.0.2.1 has been blocked",
            "reputation",
            "text-client-refused",
            True,
        ),
        (
            "450 4.7.1 Client host rejected: cannot find your hostname, [192.0.2.1]",
            "rdns",
            "text-rdns",
            False,
        ),
        (
            "450 4.7.1 Access denied. IP name lookup failed [192.0.2.1]",
            "rdns",
            "text-rdns-lookup-failed",
            False,
        ),
        (
            "550 5.7.1 Relaying denied. IP name lookup failed [192.0.2.1]",
            "policy",
            "enhanced-x.7.1-rejected",
            True,
        ),
        # the stage the wrapper names: before any command, and at HELO
        (
            "SMTP error from remote mail server after initial connection: 554 Go away",
            "reputation",
            "text-rejected-at-connection",
            True,
        ),
        (
            "host mx.example.org[192.0.2.2] refused to talk to me: 554 5.7.1 Service unavailable",
            "reputation",
            "text-rejected-at-connection",
            True,
        ),
        (
            "host mx.example.org[192.0.2.2] refused to talk to me: 421 Service not available",
            "transient",
            "code-4xx",
            False,
        ),
        (
            "SMTP error from remote mail server after EHLO relay.example.com: 550 Rejected",
            "rdns",
            "text-rejected-at-helo",
            True,
        ),
        # policy: relaying with a 4xx, allow lists, administrators
        ("451 4.7.1 Relaying denied", "policy", "text-relay-denied-deferred", False),
        ("550 Sender is not on the approved senders list", "policy", "text-policy", True),
        ("550 Message delivery prohibited by administrator", "policy", "text-policy", True),
        # content, TLS, the receiver's own state
        ("554 Executable attachments are not allowed", "content", "text-content", True),
        ("554 Message scored too high on our content filter", "content", "text-content", True),
        ("454 Cipher suite not acceptable", "tls", "text-tls", False),
        (
            "554 5.3.2 System not accepting network messages",
            "transient",
            "enhanced-x.3.2-rejected",
            True,
        ),
        ("550 5.2.4 Mailing list expansion problem", "transient", "enhanced-x.2.4", True),
    ],
)
def test_receivers_wordings(reply, category, rule_id, permanent):
    result = classify(read_reply(reply), "generic")
    assert (result.category, result.rule_id, result.permanent) == (category, rule_id, permanent)


# --------------------------------------------------------------------------- 1.3 families
SISIMAI = "sisimai/p5-sisimai@21cfb932:lib/Sisimai/"


@pytest.mark.parametrize(
    ("reply", "provider", "category", "rule_id", "permanent", "source"),
    [
        # a phrase of each ported list, in a reply as receivers send it
        (
            "550 sorry, no mailbox by that name is currently available",
            "generic",
            "mailbox_unknown",
            "sisimai-user-unknown",
            True,
            "Reason/UserUnknown.pm",
        ),
        (
            "553 mail domain mentioned in email address is unknown",
            "generic",
            "bad_domain",
            "sisimai-host-unknown",
            True,
            "Reason/HostUnknown.pm",
        ),
        (
            "550 5.1.1 <x@example.org>: Recipient address rejected: Domain not found",
            "generic",
            "bad_domain",
            "sisimai-host-unknown",
            True,
            "Reason/HostUnknown.pm",
        ),
        (
            "554 Host does not accept mail",
            "generic",
            "bad_domain",
            "sisimai-host-unknown",
            True,
            "Reason/NotAccept.pm",
        ),
        (
            "552 Maildir delivery failed: Userdisk quota 10485760 exceeded",
            "generic",
            "mailbox_full",
            "sisimai-mailbox-full",
            False,
            "Reason/MailboxFull.pm",
        ),
        (
            "552 too much mail data",
            "generic",
            "mailbox_full",
            "sisimai-mailbox-full",
            False,
            "Reason/MailboxFull.pm (NTT Docomo)",
        ),
        (
            "550 Mailbox is frozen",
            "generic",
            "mailbox_disabled",
            "sisimai-suspend",
            True,
            "Reason/Suspend.pm",
        ),
        (
            "550 kijitora@example.jp has been replaced by neko@example.jp",
            "generic",
            "mailbox_disabled",
            "sisimai-suspend",
            True,
            "Reason/HasMoved.pm",
        ),
        (
            "550 5.7.1 <root@example.jp>... BATV validation failure",
            "generic",
            "authentication",
            "sisimai-rejected",
            True,
            "Reason/Rejected.pm (SonicWall)",
        ),
        (
            "550 5.7.0 <s@example.jp>... Please use the smtp server of your ISP.",
            "generic",
            "reputation",
            "text-client-refused",
            True,
            "Reason/Blocked.pm",
        ),
        (
            "554 mr28p00im-smtpin040.me.com ESMTP not accepting connections",
            "generic",
            "reputation",
            "text-client-refused",
            True,
            "Reason/Blocked.pm (iCloud)",
        ),
        (
            "554 mr28p00im-smtpin040.me.com ESMTP not accepting connections",
            "apple",
            "reputation",
            "apple-not-accepting-connections",
            True,
            "Rhost/Apple.pm",
        ),
        (
            "450 service permits 2 unverifyable sending IPs - example.com is not 192.0.2.2",
            "generic",
            "rdns",
            "sisimai-require-ptr",
            False,
            "Reason/RequirePTR.pm",
        ),
        (
            "550 5.7.1 Rejected: SpamAssassin score 12.5",
            "generic",
            "content",
            "text-content",
            True,
            "Reason/SpamDetected.pm",
        ),
        (
            "554 Message rejected: Email address is not verified. The following identities failed the check in region US-EAST-1: s@example.com",
            "generic",
            "policy",
            "sisimai-policy",
            True,
            "Reason/NoRelaying.pm (Amazon SES)",
        ),
        (
            "550 5.7.1 Message MIME complexity exceeds the policy maximum",
            "generic",
            "content",
            "text-malformed",
            True,
            "Reason/ContentError.pm (Exchange)",
        ),
        (
            "552 Line limit exceeded",
            "generic",
            "message_too_large",
            "text-message-too-large",
            True,
            "Reason/MesgTooBig.pm",
        ),
        (
            "421 Too many SMTP sessions for this host",
            "generic",
            "rate_limited",
            "text-rate-limited",
            False,
            "Reason/TooManyConn.pm (Sendmail)",
        ),
        (
            "451 Requested action aborted: local error in processing",
            "generic",
            "transient",
            "text-receiver-error",
            False,
            "Reason/SystemError.pm (RFC 5321's 451 text)",
        ),
        (
            "451 Host not found, try again",
            "generic",
            "transient",
            "text-network",
            False,
            "Reason/NetworkError.pm",
        ),
        (
            "550 5.1.0 <s@example.com> sender rejected. Refer to Error Codes section at https://www.cox.com/residential/support/email-error-codes.html for more information. AUP#CDRBL",
            "generic",
            "reputation",
            "aup-client-blocked",
            True,
            "Rhost/Cox.pm",
        ),
        (
            "550 5.1.0 <s@example.com> sender rejected. AUP#In-1310",
            "generic",
            "rate_limited",
            "text-rate-limited",
            True,
            "Rhost/Spectrum.pm",
        ),
        (
            "550 5.7.750 Service unavailable. Client blocked from sending from unregistered domains",
            "microsoft",
            "policy",
            "microsoft-unregistered-domain",
            True,
            "Microsoft 5.7.750 (and Rhost/Microsoft.pm)",
        ),
    ],
)
def test_ported_phrase_lists(reply, provider, category, rule_id, permanent, source):
    result = classify(read_reply(reply), provider)
    assert (result.category, result.rule_id, result.permanent) == (category, rule_id, permanent), (
        SISIMAI + source
    )


@pytest.mark.parametrize(
    "reply",
    [
        # our own sender refused: no recipient is suppressed (1.2 read these as unknown or bad domain)
        "550 Unroutable sender address",
        "550 Sender email address rejected",
        "550 Sender IP address rejected",
        # at MAIL FROM no recipient had been named yet, whatever words follow
        "SMTP error from remote mail server after MAIL FROM:<s@example.com>: host mx.example.org [192.0.2.1]: 550 this recipient is not in my validrcptto list",
        "host mx.example.org[192.0.2.1] said: 550 Mailbox is frozen (in reply to MAIL FROM command)",
        # X.1.7/X.1.8 are about our sender
        "550 5.1.7 <s@example.com>: no mailbox by that name is currently available",
    ],
)
def test_a_refusal_of_our_sender_suppresses_no_recipient(reply):
    result = classify(read_reply(reply), "generic")
    assert result.category not in ("mailbox_unknown", "bad_domain", "mailbox_disabled")
    assert result.action != "suppress_recipient"


# --------------------------------------------------------------------------- 1.4
@pytest.mark.parametrize(
    ("reply", "category", "rule_id", "permanent"),
    [
        # MTAs' own bounce wordings (Sisimai Lhost/*.pm $messagesof), as their bounces quote them
        (
            "550 all relevant MX records point to non-existent hosts",
            "bad_domain",
            "mta-host-unknown",
            True,
        ),
        (
            "DNS Error: 80335577 DNS type 'mx' lookup of example.jp responded with code NXDOMAIN",
            "bad_domain",
            "mta-host-unknown",
            False,  # no reply code: a text alone is never permanent
        ),
        ("421 Temporary failure in MX lookup", "transient", "mta-network", False),
        ("550 Sorry, no valid route to destination", "transient", "mta-network", True),
        ("550 delivery to pipe forbidden", "transient", "mta-system-error", True),
        ("452 mailbox unavailable (not enough free space)", "transient", "mta-system-error", False),
        (
            "550 User neko not listed in Domino Directory",
            "mailbox_unknown",
            "mta-user-unknown",
            True,
        ),
        ("554 5.7.0 id=12345-01 - INFECTED: Eicar-Test", "content", "mta-content", True),
        ("552 error: quota exceeded", "mailbox_full", "mta-mailbox-full", False),
        # Exim's "LMTP error after ..." only introduces the LMTP server's own reply
        (
            "LMTP error after end of data: 452 4.2.2 <x@example.org> Mailbox is full",
            "mailbox_full",
            "text-mailbox-full",
            False,
        ),
        # RFC 3463 X.7: a detail without a rule of its own is still security or policy
        ("550 5.7.6 Cryptographic algorithm not supported", "tls", "enhanced-x.7.6", True),
        ("550 5.7.99 Go away", "policy", "enhanced-x.7.x-rejected", True),
        ("451 4.7.99 Go away for now", "transient", "code-4xx", False),
        ("550 5.4.7 Delivery time expired", "transient", "enhanced-x.4.7", True),
        ("554 5.4.3 Directory server failure", "transient", "enhanced-x.4.2-3-rejected", True),
        ("554 5.3.3 System not capable of selected features", "transient", "enhanced-x.3.x", True),
        # from BounceParser's tune part (tests/corpus/README.md)
        ("[dest.example.com]: Name or service not known", "transient", "text-network", False),
        ("550 5.7.1 No mailbox found", "mailbox_unknown", "text-mailbox-unknown", True),
        (
            "550 5.2.1 Mailbox not available / Konto niedostepne",
            "mailbox_disabled",
            "text-mailbox-unavailable-x.2.1",
            True,
        ),
        ("550 Mailbox not available", "mailbox_unknown", "text-mailbox-unknown", True),
        # an unknown user said with a 4xx is read as such, and retried
        (
            "450 <x@example.org>: User unknown",
            "mailbox_unknown",
            "text-mailbox-unknown-deferred",
            False,
        ),
        (
            "450 Requested mail action not taken: mailbox unavailable",
            "transient",
            "code-4xx",
            False,
        ),
    ],
)
def test_14_wordings_and_codes(reply, category, rule_id, permanent):
    result = classify(read_reply(reply), "generic")
    assert (result.category, result.rule_id, result.permanent) == (category, rule_id, permanent)


@pytest.mark.parametrize(
    "reply",
    [
        # qmail-remote's "does not like recipient." only introduces what the remote host said
        "192.0.2.25 does not like recipient. Remote host said: 552 5.2.2 <x@example.org>: Mailbox full",
        "SMTP error from remote mail server after MAIL FROM:<s@example.com>: host mx.example.org [192.0.2.1]: 550 all relevant MX records point to non-existent hosts",
    ],
)
def test_14_an_mta_wording_does_not_suppress_the_wrong_thing(reply):
    result = classify(read_reply(reply), "generic")
    assert result.category not in ("mailbox_unknown", "bad_domain")


# --------------------------------------------------------------------------- 1.5
@pytest.mark.parametrize(
    ("reply", "category", "rule_id"),
    [
        # RFC 3463's mailbox and address subjects as receivers localise them
        ("550 5.1.1 Benutzer unbekannt", "mailbox_unknown", "text-mailbox-unknown-other-languages"),
        (
            "550 Empfaenger existiert nicht",
            "mailbox_unknown",
            "text-mailbox-unknown-other-languages",
        ),
        ("550 Destinataire inconnu", "mailbox_unknown", "text-mailbox-unknown-other-languages"),
        ("550 El usuario no existe", "mailbox_unknown", "text-mailbox-unknown-other-languages"),
        ("550 Usuário inexistente", "mailbox_unknown", "text-mailbox-unknown-other-languages"),
        ("550 utente sconosciuto", "mailbox_unknown", "text-mailbox-unknown-other-languages"),
        ("552 Postfach voll", "mailbox_full", "text-mailbox-full-other-languages"),
        ("452 Boite du destinataire pleine", "mailbox_full", "text-mailbox-full-other-languages"),
        ("552 buzón lleno", "mailbox_full", "text-mailbox-full-other-languages"),
        ("552 caixa postal cheia", "mailbox_full", "text-mailbox-full-other-languages"),
        ("550 Postfach gesperrt", "mailbox_disabled", "text-mailbox-disabled-other-languages"),
        (
            "550 Le compte du destinataire est bloque",
            "mailbox_disabled",
            "text-mailbox-disabled-other-languages",
        ),
        ("550 conta inativa", "mailbox_disabled", "text-mailbox-disabled-other-languages"),
        ("550 adresse: domaine inconnu", "bad_domain", "text-bad-domain-other-languages"),
        # the receiver's judgement of our client, no list named
        ("554 5.7.1 Rejected because Bad IP", "reputation", "text-client-refused"),
        (
            "554 Your access to this mail system has been rejected",
            "reputation",
            "text-client-refused",
        ),
        (
            "554 IP=192.0.2.1 - A problem occurred. (Ask your postmaster for help or to contact"
            " tosa@rx.t-online.de to clarify.)",
            "reputation",
            "text-client-refused",
        ),
        # our host name, our sender domain, TLS, rates
        ("550 5.7.1 HELO hostname does not resolve", "rdns", "text-rdns"),
        ("550 5.7.1 Your host name does not match your IP address", "rdns", "text-rdns"),
        ("550 5.7.0 Sender domain does not resolve", "authentication", "text-sender-rejected"),
        ("550 Secure connection required", "tls", "text-tls"),
        ("421 Too much mail from 192.0.2.1", "rate_limited", "text-rate-limited"),
        ("450 Too many mails sent recently", "rate_limited", "text-rate-limited"),
        ("421 Hourly limit exceeded", "rate_limited", "text-rate-limited"),
        ("554 Connection denied", "reputation", "text-client-refused"),
        ("421 4.7.0 Connection refused from your IP", "reputation", "text-client-refused-deferred"),
        ("550 5.7.1 Mail from this IP is not accepted", "reputation", "text-client-refused"),
        ("550 5.7.1 Helo name invalid", "rdns", "text-rdns"),
        ("550 5.7.1 Your hostname is not fully qualified", "rdns", "text-rdns"),
        ("550 Unresolvable Return Address", "authentication", "text-sender-rejected"),
        ("550 Message blocked: contains suspicious links", "content", "text-content"),
        ("550 5.7.1 Message content not accepted", "content", "text-content"),
        ("554 Transaction failed: Message loop detected", "transient", "text-mail-loop"),
        (
            "554 Sorry, mail system is having trouble. Please try again later.",
            "transient",
            "text-receiver-error",
        ),
        ("550 Account frozen", "mailbox_disabled", "sisimai-suspend"),
        ("552 Mailbox has exceeded the limit", "mailbox_full", "text-mailbox-full"),
        # Postfix's "Host not found, try again" is a lookup that failed for now, not a domain gone
        (
            "Host or domain name not found. Name service error for name=example.jp type=A:"
            " Host not found, try again",
            "transient",
            "text-network",
        ),
        (
            "Host or domain name not found. Name service error for name=example.jp type=A:"
            " Host not found",
            "bad_domain",
            "sisimai-host-unknown",
        ),
        # the reporting MTA's own words for a connection that failed on the way
        (
            "conversation with mx.example.com[192.0.2.1] timed out while receiving the initial"
            " server greeting",
            "transient",
            "text-network",
        ),
        (
            "connect to mx.example.com[192.0.2.1]:25: Network is unreachable",
            "transient",
            "text-network",
        ),
        (
            "retry time not reached for any host after a long failure period",
            "transient",
            "text-network",
        ),
        ("Remote host closed connection in response to end of data", "transient", "text-network"),
        ("550 This user has moved to another address", "mailbox_disabled", "text-mailbox-disabled"),
        ("554 Message contains NUL characters", "content", "text-malformed"),
        ("554 Domain has no MX record", "bad_domain", "text-bad-domain"),
        ("450 4.7.1 Maximum number of connections exceeded", "rate_limited", "text-rate-limited"),
        # Sendmail's relaying refusal names authentication as the way to be allowed to relay
        (
            "550 5.7.1 Relaying denied. Proper authentication required.",
            "policy",
            "enhanced-x.7.1-rejected",
        ),
        (
            "421 4.7.0 You have exceeded the allowed number of messages per hour",
            "rate_limited",
            "text-rate-limited",
        ),
    ],
)
def test_15_wordings(reply, category, rule_id):
    result = classify(read_reply(reply), "generic")
    assert (result.category, result.rule_id) == (category, rule_id)


@pytest.mark.parametrize(
    "reply",
    [
        # Orange refusing our client IP, and a sender, are never the recipient's mailbox
        "550 5.7.1 Adresse IP source bloquee pour incident de spam",
        "550 Absender unbekannt",
        "550 Adresse de l'expéditeur inconnue",
        "552 too much mail data",
    ],
)
def test_15_localised_words_do_not_suppress_the_wrong_thing(reply):
    result = classify(read_reply(reply), "generic")
    assert result.category not in ("mailbox_unknown", "mailbox_disabled", "rate_limited"), result


@pytest.mark.parametrize(
    ("reply", "category", "rule_id"),
    [
        # Postfix local(8) past mailbox_size_limit: the mailbox file is too large, not the message
        (
            "552 5.2.2 cannot update mailbox /var/mail/alice for user alice. error writing"
            " message: File too large",
            "mailbox_full",
            "mta-mailbox-full",
        ),
        # a spam verdict whose advice names SPF, HELO or PTR is a verdict on the message
        (
            "550 Message rejected due to spam classification by our filters",
            "content",
            "text-spam-verdict",
        ),
        (
            "554 5.7.1 Your message failed our antispam checks and was rejected. Check your SPF,"
            " HELO and PTR settings.",
            "content",
            "text-spam-verdict",
        ),
        # ... but a failed SPF or DKIM check, and our IP, keep their own rules
        (
            "550 5.7.1 Rejected as spam: SPF check failed for example.com",
            "authentication",
            "text-authentication",
        ),
        (
            "550 5.7.1 Message rejected due to spam: DKIM signature did not pass",
            "authentication",
            "text-authentication",
        ),
        (
            "554 5.7.1 Your IP address 192.0.2.1 was rejected due to spam",
            "reputation",
            "text-client-refused",
        ),
        # an address that cannot name a mailbox, whatever detail Exchange gives it
        ("550 5.1.2 Invalid X.400 address", "mailbox_unknown", "text-mailbox-unknown"),
        (
            "550 5.1.6 Recipient addresses in single label domains not accepted",
            "mailbox_unknown",
            "text-mailbox-unknown",
        ),
        ("550 BAD_RECIPIENT", "mailbox_unknown", "text-mailbox-unknown"),
        # vpopmail's vdelivermail cannot write the Maildir: the receiving system's own trouble
        (
            "can not open new email file errno=13 file=/home/vpopmail/domains/example.com/a/x",
            "transient",
            "mta-system-error",
        ),
        (
            "550 The recipient does not accept email in non-Latin character sets",
            "content",
            "text-content",
        ),
    ],
)
def test_16_wordings(reply, category, rule_id):
    result = classify(read_reply(reply), "generic")
    assert (result.category, result.rule_id) == (category, rule_id)


@pytest.mark.parametrize(
    ("reply", "category"),
    [
        ("421 4.7.0 Too many open connections from your IP, try later", "rate_limited"),
        (
            "450 4.7.1 Message submission rate for this client has exceeded the limit",
            "rate_limited",
        ),
        ("530 5.7.0 This server requires authentication", "authentication"),
        ("535 5.7.3 Authentication unsuccessful", "authentication"),
        ("550 5.7.1 See http://www.openspf.org/Why?s=mfrom&id=x", "authentication"),
        ("550 5.4.7 retry timeout exceeded", "transient"),
        ("550 5.2.1 Mailbox blocked due to inactivity", "mailbox_disabled"),
        ("553 sorry, that address is not in my validrcptto list (#5.7.1)", "mailbox_unknown"),
    ],
)
def test_16_mta_wordings(reply, category):
    """The MTAs' own wordings 1.6 added (Postfix, qmail, Exchange, Exim), not corpus texts."""
    assert classify(read_reply(reply), "generic").category == category


def test_an_outgoing_quota_or_the_receivers_disk_is_not_a_full_mailbox():
    # Amazon SES's sending quota (Sisimai TooManyConn) and a receiver's own disk (RFC 3463 X.3.1)
    assert classify(
        "454 Throttling failure: Daily message quota exceeded.", "generic"
    ).category == ("rate_limited")
    assert classify("452 4.3.1 Insufficient disk space; try again later", "generic").category == (
        "transient"
    )


def test_a_4xx_from_a_ported_list_is_never_permanent():
    for reply in (
        "450 sorry, no mailbox by that name is currently available",
        "451 Mailbox is frozen",
        "452 mail domain mentioned in email address is unknown",
        "421 Please use the smtp server of your ISP",
        "451 AUP#CDRBL",
    ):
        assert classify(read_reply(reply), "generic").permanent is False, reply


def test_a_text_rule_drives_suspensions_only_for_a_named_list_or_a_rate():
    """blocklisted and rate_limited feed runbooks/shaping.yaml's suspensions: the generic text
    rules that give them are these, each backed by its source; words like 'blocked' alone or a
    URI list give reputation or content, which suspend nothing by themselves."""
    spec = load_file(CLASSIFICATION_FILE).spec
    generic = spec.text_rules + spec.enhanced_code_rules + spec.fallback_text_rules
    suspending = {r.id for r in generic if r.category in ("blocklisted", "rate_limited")}
    assert suspending == {
        "text-blocklisted",
        "text-recipient-rate",
        "text-rate-limited",
        "enhanced-x.7.28",
    }


def test_gmails_message_id_quota_is_not_a_full_mailbox():
    for wording in ("that have the same Message-ID", "with the same Message-ID:"):
        reply = f"421 4.7.28 Gmail has detected this message exceeded its quota for sending messages {wording}. - gsmtp"
        result = classify(reply)
        assert (result.category, result.rule_id) == ("rate_limited", "google-same-message-id")
    assert classify("552 5.2.2 The account has exceeded its quota", "generic").category == (
        "mailbox_full"
    )


def test_gmail_per_recipient_rate_is_not_an_inactive_mailbox():
    # The IANA table reads X.2.1 as "mailbox disabled"; Gmail's 450 4.2.1 is a rate limit.
    reply = "450 4.2.1 The user you are trying to contact is receiving mail too quickly. - gsmtp"
    assert classify(reply, "google").category == "rate_limited"
    assert classify("450 4.2.1 Try later", "google").category == "mailbox_disabled"


def test_unknown_provider_tries_every_provider_rule_and_names_the_provider():
    reply = f"553 5.7.2 [TSS09] All messages from {IP} will be permanently deferred"
    result = classify(reply)
    assert (result.provider, result.rule_id) == ("yahoo", "yahoo-tss09-permanently-deferred")
    # A known provider only gets its own rules: Yahoo's tag means nothing at Microsoft.
    at_microsoft = classify(reply, "microsoft")
    assert at_microsoft.provider == "microsoft"
    assert not at_microsoft.rule_id.startswith("yahoo-")


def test_generic_reply_without_provider_names_none():
    result = classify("550 5.1.1 <x@example.org>: User unknown")
    assert result.provider is None


def test_positive_replies_are_delivered_whatever_the_text():
    for reply in ("250 2.0.0 Ok: queued, spam score 0.1", "250 2.6.0 blocked using nothing"):
        result = classify(reply, None)
        assert (result.category, result.permanent, result.rule_id) == (
            "delivered",
            False,
            "code-2xx",
        )


# --------------------------------------------------------------------------- fallbacks
@pytest.mark.parametrize(
    ("reply", "category", "permanent", "rule_id"),
    [
        ("550 5.1.1 bye", "mailbox_unknown", True, "enhanced-x.1.1-rejected"),
        ("450 4.1.1 later", "mailbox_unknown", False, "enhanced-x.1.1-deferred"),
        ("550 5.1.2 bye", "bad_domain", True, "enhanced-x.1.2-rejected"),
        ("556 5.1.10 bye", "bad_domain", True, "enhanced-x.1.10-rejected"),
        ("550 5.2.1 bye", "mailbox_disabled", True, "enhanced-x.2.1-rejected"),
        ("552 5.2.2 bye", "mailbox_full", False, "enhanced-x.2.2"),
        ("552 5.3.4 bye", "message_too_large", True, "enhanced-x.3.4"),
        ("552 5.5.3 bye", "policy", False, "enhanced-x.5.3"),
        ("550 5.7.1 bye", "policy", True, "enhanced-x.7.1-rejected"),
        ("530 5.7.10 bye", "tls", True, "enhanced-x.7.10-11"),
        ("550 5.7.23 bye", "authentication", True, "enhanced-x.7.20-24"),
        ("550 5.7.25 bye", "rdns", True, "enhanced-x.7.25"),
        ("550 5.7.26 bye", "authentication", True, "enhanced-x.7.26-27"),
        ("550 5.7.27 bye", "authentication", True, "enhanced-x.7.26-27"),
        ("421 4.7.28 slow", "rate_limited", False, "enhanced-x.7.28"),
        ("451 4.4.3 later", "transient", False, "enhanced-x.4.1-5-deferred"),
        # the class comes from the reply code: Gmail sends 421 5.7.32
        ("421 5.7.32 later", "transient", False, "code-4xx"),
        ("421 later", "transient", False, "code-4xx"),
        ("554 bye", "unknown", True, "code-5xx"),
        ("550 5.9.9 bye", "unknown", True, "code-5xx"),
        ("250 ok", "delivered", False, "code-2xx"),
        ("354 go ahead", "unknown", False, "code-3xx"),
    ],
)
def test_enhanced_code_then_code_class_fallback(reply, category, permanent, rule_id):
    result = classify(reply, "generic")
    assert (result.category, result.permanent, result.rule_id) == (category, permanent, rule_id)


def test_unparseable_text_is_unknown_and_transient():
    result = classify("connection reset by peer")
    assert (result.category, result.permanent, result.rule_id) == ("unknown", False, UNPARSEABLE)
    assert result.code is None


# --------------------------------------------------------------------------- failures
@pytest.mark.parametrize(
    ("kind", "category", "permanent", "code", "enhanced"),
    [
        ("connection_refused", "transient", False, 451, "4.4.1"),
        ("connection_timeout", "transient", False, 451, "4.4.1"),
        ("connection_lost", "transient", False, 451, "4.4.2"),
        ("tls_handshake", "tls", False, 451, "4.7.5"),
        ("dns_nxdomain", "bad_domain", True, 550, "5.1.2"),
        ("dns_null_mx", "bad_domain", True, 556, "5.1.10"),
        ("dns_no_mail_host", "bad_domain", True, 550, "5.4.4"),
        ("dns_servfail", "transient", False, 451, "4.4.3"),
        ("dns_timeout", "transient", False, 451, "4.4.3"),
    ],
)
def test_connection_failures(kind, category, permanent, code, enhanced):
    result = classify(ConnectionFailure(kind, "detail"), "google")
    assert (result.category, result.permanent, result.code, result.enhanced_code) == (
        category,
        permanent,
        code,
        enhanced,
    )
    assert result.provider == "google"
    assert result.rule_id.startswith("failure-")


def test_every_failure_kind_is_tested_and_bogus_kinds_refused():
    assert set(FAILURE_KINDS) == set(rules().failures)
    with pytest.raises(ValueError, match="unknown connection failure kind"):
        ConnectionFailure("dns_bogus")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- parsing
def test_multiline_reply_joins_lines_and_strips_repeated_enhanced_code():
    reply = parse_reply("421-4.7.28 first part\n421-4.7.28 second\n421 4.7.28 last - gsmtp")
    assert reply == Reply(421, "4.7.28", "first part second last - gsmtp")


def test_a_client_librarys_code_and_message_classify_like_the_wire_reply():
    from aiosmtplib import SMTPResponse

    # aiosmtplib (like smtplib) strips "421-"/"421 " from each line and joins with newlines.
    response = SMTPResponse(
        421,
        f"4.7.28 [{IP}] Gmail has detected an unusual rate of unsolicited mail originating\n"
        "4.7.28 from your IP address. - gsmtp",
    )
    reply = Reply.from_response(response.code, response.message)
    assert reply.enhanced == "4.7.28" and "4.7.28" not in reply.text
    wire = classify(
        f"421-4.7.28 [{IP}] Gmail has detected an unusual rate of unsolicited mail originating\n"
        "421 4.7.28 from your IP address. - gsmtp"
    )
    assert classify(reply) == classify(f"{response.code} {response.message}") == wire
    assert wire.rule_id == "google-unusual-rate-deferred"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("550 5.1.1 <x@y>: user unknown", Reply(550, "5.1.1", "<x@y>: user unknown")),
        ("smtp; 550 5.1.1 <x@y>: user unknown", Reply(550, "5.1.1", "<x@y>: user unknown")),
        ("421", Reply(421, None, "")),
        ("550-5.7.1 cut from a log", Reply(550, "5.7.1", "cut from a log")),
        ("554 For explanation 5.1.1 later", Reply(554, None, "For explanation 5.1.1 later")),
        ("550 5.01.001 zeros", Reply(550, "5.1.1", "zeros")),
    ],
)
def test_parse_reply(raw, expected):
    assert parse_reply(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("hello", "must start with a 3-digit code"),
        ("", "empty"),
        ("650 nope", "must start with a 3-digit code"),
        ("421-4.7.0 a\n550 5.7.1 b", "line 2 has code 550"),
        ("550 5.1.1 a\n550 5.1.1 b", "line 2 follows the final line"),
    ],
)
def test_parse_reply_errors(raw, message):
    with pytest.raises(ReplyParseError, match=message):
        parse_reply(raw)


# The shapes bounces, logs and people quote replies in (issue 13): read, never refused.
EXIM = "SMTP error from remote mail server after RCPT TO:<x@example.jp>: host mx.example.jp [192.0.2.153]:"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # no reply code: the enhanced code when there is one, and the text
        (
            "5.1.1 <x@example.jp>... User Unknown",
            Reply(None, "5.1.1", "<x@example.jp>... User Unknown"),
        ),
        ("User unknown", Reply(None, None, "User unknown")),
        (
            "no mailbox by that name (#5.1.1)",
            Reply(None, "5.1.1", "no mailbox by that name (#5.1.1)"),
        ),
        (
            "error '5.7.1 <x@y>... Access denied'",
            Reply(None, "5.7.1", "error '5.7.1 <x@y>... Access denied'"),
        ),
        ("", Reply(None, None, "")),
        # "550:" instead of "550 "
        ("501: 5.1.8 Sender address rejected", Reply(501, "5.1.8", "Sender address rejected")),
        ("550:User unknown", Reply(550, None, "User unknown")),
        # a DSN's Diagnostic-Code field, any diagnostic type
        (
            "Diagnostic-Code: smtp; 550 5.1.1 <x@y>: user unknown",
            Reply(550, "5.1.1", "<x@y>: user unknown"),
        ),
        ("Diagnostic-Code: SMTP;550 user unknown", Reply(550, None, "user unknown")),
        (
            "X-Postfix; host mx[192.0.2.1] said: 552 5.2.2 Over quota (in reply to RCPT TO command)",
            Reply(
                552, "5.2.2", "host mx[192.0.2.1] said: Over quota (in reply to RCPT TO command)"
            ),
        ),
        # MTA wrappers: the wrapper's words stay, they can name the failed command
        (
            f"{EXIM} 550 5.1.1 <x@example.jp>... User Unknown",
            Reply(550, "5.1.1", f"{EXIM} <x@example.jp>... User Unknown"),
        ),
        (
            "Connected to 192.0.2.2 but sender was rejected. Remote host said: 553 5.1.8 No such domain",
            Reply(
                553,
                "5.1.8",
                "Connected to 192.0.2.2 but sender was rejected. Remote host said: No such domain",
            ),
        ),
        (
            "did not like our RCPT TO:550 5.1.6 moved",
            Reply(550, "5.1.6", "did not like our RCPT TO: moved"),
        ),
        ("<<< 550 SC-004 complaints", Reply(550, None, "<<< SC-004 complaints")),
        (
            "#550 5.7.1 RESOLVER.RST.AuthRequired; authentication required",
            Reply(550, "5.7.1", "# RESOLVER.RST.AuthRequired; authentication required"),
        ),
        # a multi-line reply flattened by the reporter
        (
            "mx said: 550-5.7.1 first\n550-5.7.1 second\n550 5.7.1 last",
            Reply(550, "5.7.1", "mx said: first second last"),
        ),
        # a number is a reply code when introduced or followed by an enhanced code
        (
            "exceeds the limit of 250 attachments",
            Reply(None, None, "exceeds the limit of 250 attachments"),
        ),
        ("from [203.0.113.2] 550 5.7.1 blocked", Reply(550, "5.7.1", "from [203.0.113.2] blocked")),
        # what parse_reply reads is read the same
        ("421-4.7.28 a\n421 4.7.28 b - gsmtp", Reply(421, "4.7.28", "a b - gsmtp")),
    ],
)
def test_read_reply(raw, expected):
    assert read_reply(raw) == expected


@settings(max_examples=examples(300), deadline=None)
@given(text=st.text())
def test_read_reply_never_raises_and_agrees_with_parse_reply(text):
    reply = read_reply(text)
    try:
        strict = parse_reply(text)
    except ReplyParseError:
        return
    if strict.code < 400 and reply != strict:
        # a transcript: the failure quoted after a positive or intermediate reply answers
        assert reply.code >= 400 and str(reply.code) in strict.text
        return
    assert reply == strict


def test_a_failure_after_an_intermediate_reply_is_the_answer():
    reply = read_reply(
        "354 End data with <CR><LF>.<CR><LF> 451 4.3.0 Error: queue file write error"
    )
    assert (reply.code, reply.enhanced) == (451, "4.3.0")
    assert classify(reply).category == "transient"
    assert read_reply("250 2.0.0 Ok: queued as 4Q1X") == parse_reply("250 2.0.0 Ok: queued as 4Q1X")


@pytest.mark.parametrize(
    ("raw", "category", "permanent", "rule_id"),
    [
        # the class, and with it the permanence, from the enhanced code
        ("5.1.1 <x@example.jp>... User Unknown", "mailbox_unknown", True, "text-mailbox-unknown"),
        ("4.7.1 greylisted, come back later", "transient", False, "text-greylisted"),
        ("5.9.9 bye", "unknown", True, "code-5xx"),
        ("2.0.0 queued, spam score 0.1", "delivered", False, "code-2xx"),
        # no class at all: the words decide, a code condition rules nothing out, transient
        ("Mailbox does not exist", "mailbox_unknown", False, "text-mailbox-unknown"),
        ("connection reset by peer", "transient", False, "text-network"),
        ("nothing a rule knows", "unknown", False, NO_RULE),
    ],
)
def test_a_reply_without_a_code_is_classified_by_its_words(raw, category, permanent, rule_id):
    result = classify(read_reply(raw))
    assert (result.category, result.permanent, result.rule_id) == (category, permanent, rule_id)
    assert result.code is None


def test_raw_text_without_a_reply_code_stays_unparseable_for_callers_that_know_more():
    # The bounce path falls back on the DSN's Status field for exactly these.
    result = classify("5.1.1 <x@example.jp>... User Unknown")
    assert (result.rule_id, result.code, result.enhanced_code) == (UNPARSEABLE, None, "5.1.1")
    wrapped = classify(f"{EXIM} 550 5.1.1 <x@example.jp>... User Unknown")
    assert (wrapped.category, wrapped.code) == ("mailbox_unknown", 550)


@pytest.mark.parametrize(
    ("raw", "category"),
    [
        # the reporting MTA's host names and the addresses are not the failure's words
        (
            "host barracuda.example.edu[192.0.2.7] said: 550 5.1.1 <j@example.edu>: Recipient"
            " address rejected: User unknown (in reply to RCPT TO command)",
            "mailbox_unknown",
        ),
        (
            "SMTP error from remote mail server after RCPT TO:<j@example.net>: host"
            " mx.blocklist.example.net [192.0.2.7]: 550 5.1.1 No such user",
            "mailbox_unknown",
        ),
        (
            "----- Transcript of session follows ----- ... while talking to"
            " spamfilter.example.org.: >>> RCPT To:<j@example.org> <<< 550 5.1.1 User unknown",
            "mailbox_unknown",
        ),
        ("550 5.7.1 <spamtrap@example.com>: Recipient address rejected: Access denied", "policy"),
        # a DNS block list named by its zone is still read: it is the reply's own word
        (
            "554 5.7.1 Service unavailable; Client host [192.0.2.7] blocked using zen.spamhaus.org",
            "blocklisted",
        ),
    ],
)
def test_host_names_and_addresses_do_not_decide_the_category(raw, category):
    assert classify(read_reply(raw), "generic").category == category


def test_an_enhanced_code_quoted_at_the_end_is_read():
    # qmail and vpopmail: "(#5.1.1)" after the text, not at its start
    result = classify(read_reply("553 sorry, that recipient is not here (#5.1.1)"), "generic")
    assert (result.category, result.enhanced_code) == ("mailbox_unknown", "5.1.1")
    assert classify(read_reply("554 go away (#5.7.1)"), "generic").category == "policy"


def test_split_replies_groups_continuation_lines():
    lines = [
        "421-4.7.28 a\n",
        "421 4.7.28 b\n",
        "\n",
        "not a reply\n",
        "550-5.7.1 cut short\n",
        "250 ok\n",
    ]
    assert list(split_replies(lines)) == [
        (1, "421-4.7.28 a\n421 4.7.28 b"),
        (4, "not a reply"),
        (5, "550-5.7.1 cut short"),
        (6, "250 ok"),
    ]


# --------------------------------------------------------------------------- providers
@pytest.mark.parametrize(
    ("mx", "provider"),
    [
        ("gmail-smtp-in.l.google.com", "google"),
        ("alt1.gmail-smtp-in.l.google.com.", "google"),
        ("ASPMX.L.GOOGLE.COM", "google"),
        ("smtp.google.com", "google"),
        ("alt2.aspmx.l.googlemail.com", "google"),
        ("hotmail-com.olc.protection.outlook.com", "microsoft"),
        ("example-org.mail.protection.outlook.com", "microsoft"),
        ("example-org.o-v1.mx.microsoft", "microsoft"),
        ("mx1.hotmail.com", "microsoft"),
        ("mta5.am0.yahoodns.net", "yahoo"),
        ("mx-aol.mail.gm0.yahoodns.net", "yahoo"),
        ("mx01.mail.icloud.com", "apple"),
        ("mx1a1.comcast.net", "comcast"),
        ("mx00.gmx.net", "gmx"),
        ("mx-ha02.web.de", "gmx"),
        ("smtp-in.orange.fr", "orange"),
        ("mx.example.org", "generic"),
        ("notgoogle.com", "generic"),  # a suffix matches on a label boundary only
        ("google.com.evil.example", "generic"),
        ("", "generic"),
    ],
)
def test_provider_for_mx(mx, provider):
    assert provider_for_mx(mx) == provider


def test_every_named_provider_has_rules():
    named = {p for _, p in rules().mx_suffixes}
    with_rules = {c.rule.provider for c in rules().by_provider[None]} - {"any"}
    assert named == with_rules


# --------------------------------------------------------------------------- runbooks
def test_every_shipped_runbook_validates():
    found = load_all()
    assert found["classification"].kind == "classification"
    assert found["providers"].kind == "providers"
    assert rules().rule_count == len(found["classification"].spec.all_rules()) >= 150


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _raw(file: Path) -> dict:
    return yaml.safe_load(file.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: s["provider_rules"][1]["match"].pop("text"), "needs a provider and a text"),
        (lambda s: s["text_rules"][0].update(provider="google"), "only provider_rules may name"),
        (lambda s: s["text_rules"][0]["match"].update(text="(unclosed"), "not a valid regular"),
        (lambda s: s["text_rules"][0]["match"].update(unless="[bad"), "not a valid regular"),
        (lambda s: s["text_rules"][1].update(id=s["text_rules"][0]["id"]), "duplicate rule ids"),
        (lambda s: s["text_rules"][0].update(category="bounced"), "Input should be"),
        (lambda s: s["text_rules"][0].update(action="delist"), "Input should be"),
        (lambda s: s["text_rules"][0].update(colour="red"), "Extra inputs"),
        (lambda s: s["text_rules"][0].pop("source"), "Field required"),
        (lambda s: s["enhanced_code_rules"][0]["match"].update(enhanced="x.7.9-2"), "low to high"),
        (lambda s: s["text_rules"][0]["match"].update(unless_enhanced="5.1"), "String should"),
        (lambda s: s["text_rules"][0]["match"].update(unless_enhanced="x.1.8-7"), "low to high"),
        (lambda s: s["code_class_rules"][0]["match"].update(text="ok"), "matches on code only"),
        (lambda s: s["fallback_text_rules"][0].update(provider="yahoo"), "only provider_rules"),
        (lambda s: s["fallback_text_rules"][0]["match"].pop("text"), "needs a text pattern"),
        (lambda s: s["connection_failure_rules"].pop(), "need each kind once"),
        (lambda s: s["connection_failure_rules"][0].update(permanent=True), "must agree"),
    ],
)
def test_bad_classification_data_is_refused(tmp_path, mutate, reason):
    data = _raw(CLASSIFICATION_FILE)
    mutate(data["spec"])
    with pytest.raises(RunbookError, match=reason):
        load_file(_write(tmp_path, "classification.yaml", data))


def test_a_rule_for_an_unlisted_provider_is_refused(tmp_path):
    data = _raw(CLASSIFICATION_FILE)
    data["spec"]["provider_rules"][0]["provider"] = "hotmale"
    with pytest.raises(RunbookError, match="'hotmale' is not a provider") as info:
        load_rules(_write(tmp_path, "classification.yaml", data), PROVIDERS_FILE)
    assert info.value.path == "spec.provider_rules.0.provider"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: s["providers"][0]["mx_suffixes"].append(".Google.com"), "lower-case host"),
        (lambda s: s["providers"][1]["mx_suffixes"].append("google.com"), "one provider only"),
        (lambda s: s["providers"][0].update(sources=[]), "at least 1"),
        (lambda s: s.update(fallback="nobody"), "not a listed provider"),
        (lambda s: s["providers"][0].update(mx_suffixes=[]), "the fallback lists no MX"),
    ],
)
def test_bad_provider_data_is_refused(tmp_path, mutate, reason):
    data = _raw(PROVIDERS_FILE)
    mutate(data["spec"])
    with pytest.raises(RunbookError, match=reason):
        load_file(_write(tmp_path, "providers.yaml", data))


def test_schema_refuses_an_empty_match():
    from runbooks.schema import ReplyMatch

    with pytest.raises(ValidationError, match="at least one of code, enhanced, text"):
        ReplyMatch()


def test_classifying_does_no_io_after_the_first_load(monkeypatch):
    rules()

    def no_io(*args, **kwargs):
        raise AssertionError("file access on the classification path")

    monkeypatch.setattr(classify_module, "load_file", no_io)
    monkeypatch.setattr(Path, "read_text", no_io)
    monkeypatch.setattr("builtins.open", no_io)
    assert classify("550 5.1.1 user unknown", provider_for_mx("mx.example.org")).category == (
        "mailbox_unknown"
    )


# --------------------------------------------------------------------------- properties
RULES_BY_ID = {r.rule.id: r.rule for r in rules().by_provider[None] + rules().code_class}
PROVIDER_NAMES = [None, "generic", *sorted({p for _, p in rules().mx_suffixes})]


@settings(max_examples=examples(300), deadline=None)
@given(text=st.text(), provider=st.sampled_from(PROVIDER_NAMES))
def test_any_string_gets_exactly_one_valid_classification(text, provider):
    result = classify(text, provider)
    assert result.category in CATEGORIES
    assert result.action in ACTIONS
    assert isinstance(result.permanent, bool)


reply_strategy = st.builds(
    lambda code, enhanced, text: f"{code} {enhanced} {text}".strip(),
    st.integers(100, 599),
    st.one_of(
        st.just(""),
        st.builds(
            lambda c, s, d: f"{c}.{s}.{d}",
            st.sampled_from([2, 4, 5]),
            st.integers(0, 9),
            st.integers(0, 1000),
        ),
    ),
    st.one_of(
        st.text(st.characters(exclude_characters="\n"), max_size=80),
        st.sampled_from([row[1].partition(" ")[2].replace("\n", " ") for row in PUBLISHED]),
    ),
)


@settings(max_examples=examples(500), deadline=None)
@given(reply=reply_strategy, provider=st.sampled_from(PROVIDER_NAMES))
def test_permanence_follows_the_code_unless_a_rule_overrules_it(reply, provider):
    result = classify(reply, provider)
    assert result.rule_id not in (UNPARSEABLE, NO_RULE)
    rule = RULES_BY_ID[result.rule_id]
    if rule.permanent is None:
        assert result.permanent == (result.code >= 500)
    if result.code < 400:
        assert result.category in ("delivered", "unknown") and not result.permanent


# --------------------------------------------------------------------------- CLI
runner = CliRunner()


def _json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_cli_classifies_arguments():
    result = runner.invoke(
        app,
        [
            "classify",
            "550 5.1.1 <x@y>: user unknown",
            r"421-4.7.28 Gmail has detected an unusual rate of unsolicited mail\n421 4.7.28 - gsmtp",
        ],
    )
    assert result.exit_code == 0, result.output
    first, second = _json_lines(result.stdout)
    assert first == {
        "category": "mailbox_unknown",
        "permanent": True,
        "action": "suppress_recipient",
        "rule_id": "text-mailbox-unknown",
        "provider": None,
        "code": 550,
        "enhanced_code": "5.1.1",
        "reply": "550 5.1.1 <x@y>: user unknown",
    }
    assert (second["provider"], second["category"], second["enhanced_code"]) == (
        "google",
        "rate_limited",
        "4.7.28",
    )


def test_cli_reads_stdin_and_classifies_every_line():
    stdin = (
        "421-4.7.28 [192.0.2.10] Gmail has detected an unusual rate of unsolicited mail\n"
        "421 4.7.28 originating from your IP address. - gsmtp\n"
        "\n"
        "this is not [a reply]\n"
        "550 5.7.1 Service unavailable, Client host [192.0.2.10] blocked using Spamhaus\n"
    )
    result = runner.invoke(app, ["classify", "--mx", "mx1.hotmail.com", "-"], input=stdin)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    gmail_text, not_a_reply, spamhaus = _json_lines(result.stdout)
    # --mx says Microsoft answered, so Gmail's text gets no Gmail rule, only the registry.
    assert (gmail_text["provider"], gmail_text["rule_id"]) == ("microsoft", "enhanced-x.7.28")
    assert (not_a_reply["category"], not_a_reply["code"], not_a_reply["rule_id"]) == (
        "unknown",
        None,
        NO_RULE,
    )
    assert not_a_reply["reply"] == "this is not [a reply]"
    assert (spamhaus["rule_id"], spamhaus["category"]) == ("microsoft-spamhaus", "blocklisted")


# Lines the issue saw fail a whole batch, and the other shapes bounces quote replies in.
LENIENT_LINES = [
    ("501: 5.1.8 Sender address rejected", 501, "5.1.8", "authentication"),
    ("5.1.1 <x@example.jp>... User Unknown", None, "5.1.1", "mailbox_unknown"),
    ("550: <x@example.jp>: User unknown", 550, None, "mailbox_unknown"),
    ("Diagnostic-Code: smtp; 552 5.2.2 Mailbox full", 552, "5.2.2", "mailbox_full"),
    (
        "SMTP error from remote mail server after RCPT TO:<x@example.jp>: host mx.example.jp "
        "[192.0.2.153]: 550 5.1.1 <x@example.jp>... User Unknown",
        550,
        "5.1.1",
        "mailbox_unknown",
    ),
    ("Mailbox does not exist", None, None, "mailbox_unknown"),
    ("nothing a rule knows", None, None, "unknown"),
]


def test_cli_classifies_every_shape_and_never_fails_the_batch():
    stdin = "".join(f"{line}\n" for line, *_ in LENIENT_LINES)
    result = runner.invoke(app, ["classify", "-"], input=stdin)
    assert result.exit_code == 0, result.output
    got = [
        (r["reply"], r["code"], r["enhanced_code"], r["category"])
        for r in _json_lines(result.stdout)
    ]
    assert got == LENIENT_LINES


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["classify"], "nothing to classify"),
        (["classify", "250 ok", "--corpus", "tests/corpus/replies.yaml"], "not both"),
        (["classify", "--mx", "mx.example.org", "--corpus", "x.yaml"], "--mx does not apply"),
        (["classify", "--corpus", "no/such/file.yaml"], "no/such/file.yaml"),
    ],
)
def test_cli_refuses_what_it_cannot_do_naming_it(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.integration  # the axiom CLI as a subprocess: `make test`, not test-fast
def test_cli_as_a_real_process():
    axiom = Path(sys.executable).parent / "axiom"
    result = subprocess.run(
        [str(axiom), "classify", "--mx", "mta5.am0.yahoodns.net", "-"],
        input="421 4.7.0 [TSS04] Messages from 192.0.2.10 temporarily deferred\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    (line,) = _json_lines(result.stdout)
    assert (line["provider"], line["category"], line["action"]) == (
        "yahoo",
        "reputation",
        "suspend_path",
    )
