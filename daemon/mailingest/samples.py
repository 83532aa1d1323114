"""Bundled sample mail and CRM records for ``mailingest demo``, built in code (no data files).

The mail exercises what real mailboxes hold: RFC 2047 subjects, an attachment, an unknown
sender, a broken 8-bit header, an IDNA domain, a line starting with "." and, in the Gmail-style
``recent:`` mailbox, mail the owner sent. ``config/records.sample.csv`` equals
``SAMPLE_RECORDS_CSV``; a test keeps the two identical.
"""

from __future__ import annotations

from mailingest.popserver import Mailbox

SAMPLE_RECORDS_CSV = """\
id,kind,email,name
L1,lead,eve@example.org,Eve Adams
L2,lead,jurgen@müller.example,Jürgen Müller
L3,lead,frank@example.net,Frank Ortiz
C1,contact,carol@example.org;carol.jones@example.net,Carol Jones
C2,contact,dave@example.net,Dave Lee
C3,contact,grace@example.com,Grace Kim
"""


def sample_records_csv() -> str:
    """The sample CRM records (header ``id,kind,email,name``; ``;`` separates addresses)."""
    return SAMPLE_RECORDS_CSV


def _mail(headers: str, body: str) -> bytes:
    """One RFC 5322 message with CRLF line endings, as a POP3 server stores it."""
    text = headers.strip("\n") + "\n\n" + body.lstrip("\n")
    return text.replace("\n", "\r\n").encode("utf-8")


_ATTACHMENT_B64 = (
    "JVBERi0xLjQKJcOkw7zDtsOfCjEgMCBvYmoKPDwgL1R5cGUgL0NhdGFsb2cgPj4KZW5kb2JqCnRy\n"
    "YWlsZXIKPDwgL1Jvb3QgMSAwIFIgPj4KJSVFT0YK"
)


def _alice() -> list[bytes]:
    broken = _mail(
        """
From: Eve Adams <eve@example.org>
To: alice@example.com
Subject: SUBJECT_PLACEHOLDER
Date: Fri, 06 Nov 2026 16:45:00 +0000
Message-ID: <broken-subject.20261106@example.org>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
""",
        """
Hi Alice, the invoice is attached to the portal. Apologies for the odd subject line,
our mail gateway mangles it.

Eve
""",
    )
    # Undecodable 8-bit junk in a header: parsers must survive it (real gateways produce this).
    broken = broken.replace(b"SUBJECT_PLACEHOLDER", b"Invoice \xff\xfe\x80 overdue")
    return [
        _mail(
            """
From: Carol Jones <carol@example.org>
To: Alice Baker <alice@example.com>
Subject: Re: Renewal of the support contract
Date: Mon, 02 Nov 2026 09:15:00 +0100
Message-ID: <c1-renewal.20261102@example.org>
In-Reply-To: <alice-renewal.20261030@example.com>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
""",
            """
Hi Alice,

we are happy to renew for another year. Please send the updated terms.

Best regards,
Carol
""",
        ),
        _mail(
            """
From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <jurgen@xn--mller-kva.example>
To: alice@example.com
Subject: =?utf-8?q?Angebot_f=C3=BCr_Q4?=
Date: Tue, 03 Nov 2026 11:02:00 +0100
Message-ID: <angebot-q4.20261103@xn--mller-kva.example>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit
""",
            """
Hallo Alice,

anbei unser Angebot für Q4: 120 Lizenzen, Laufzeit 24 Monate.

Viele Grüße
Jürgen
""",
        ),
        _mail(
            """
From: Dave Lee <dave@example.net>
To: alice@example.com
Cc: carol@example.org
Subject: Signed order form
Date: Wed, 04 Nov 2026 14:30:00 -0500
Message-ID: <order-form.20261104@example.net>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="=_order_form_boundary"
""",
            f"""
This is a multi-part message in MIME format.

--=_order_form_boundary
Content-Type: text/plain; charset=us-ascii

Alice, the signed order form is attached.

Dave

--=_order_form_boundary
Content-Type: application/pdf; name="order-form.pdf"
Content-Disposition: attachment; filename="order-form.pdf"
Content-Transfer-Encoding: base64

{_ATTACHMENT_B64}
--=_order_form_boundary--
""",
        ),
        _mail(
            """
From: Example Weekly <newsletter@news.example.net>
To: alice@example.com
Subject: Your weekly digest
Date: Thu, 05 Nov 2026 07:00:00 +0000
Message-ID: <digest-45.20261105@news.example.net>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
""",
            """
Top stories this week:
. a line starting with a dot (served dot-stuffed, stored without the extra dot)
..two dots
.
End of digest.
""",
        ),
        broken,
        _mail(
            """
From: Eve Adams <eve@example.org>
To: alice@example.com
Cc: Grace Kim <grace@example.com>
Subject: Pilot project kickoff
Date: Mon, 09 Nov 2026 10:00:00 +0000
Message-ID: <pilot-kickoff.20261109@example.org>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
""",
            """
Alice, Grace,

shall we start the pilot on the 16th? I have booked the room.

Eve
""",
        ),
    ]


def _bob() -> list[bytes]:
    return [
        _mail(
            """
From: "Jones, Carol" <carol.jones@example.net>
To: bob@example.com
Subject: Training dates
Date: Tue, 10 Nov 2026 08:20:00 +0000
Message-ID: <training.20261110@example.net>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
""",
            """
Hi Bob, can we move the training to the 24th? (Sent from my other address.)

Carol
""",
        ),
        _mail(
            """
From: Frank Ortiz <frank@example.net>
To: bob@example.com
Subject: Pricing question
Date: Wed, 11 Nov 2026 13:05:00 -0800
Message-ID: <pricing.20261111@example.net>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
""",
            """
Bob, is there a discount for non-profits?

Frank
""",
        ),
        _mail(
            """
From: Dave Lee <dave@example.net>
To: bob@example.com
Subject: =?utf-8?b?TGllZmVydW5nIMO8YmVybW9yZ2Vu?=
Date: Thu, 12 Nov 2026 09:45:00 +0100
Message-ID: <delivery.20261112@example.net>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
""",
            """
Delivery is scheduled for tomorrow morning.
""",
        ),
        _mail(
            """
From: IT Helpdesk <helpdesk@example.com>
To: bob@example.com
Subject: Password expiry notice
Date: Fri, 13 Nov 2026 06:00:00 +0000
Message-ID: <expiry.20261113@example.com>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
""",
            """
Your password expires in 7 days.
""",
        ),
    ]


def _dana() -> list[bytes]:
    return [
        _mail(
            """
From: Eve Adams <eve@example.org>
To: dana@example.com
Subject: Reference customers
Date: Mon, 16 Nov 2026 15:10:00 +0000
Message-ID: <references.20261116@example.org>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
""",
            """
Dana, could you name two reference customers in logistics?
""",
        ),
        _mail(
            """
From: Dana Cole <dana@example.com>
To: Carol Jones <carol@example.org>
Subject: Updated terms
Date: Tue, 17 Nov 2026 09:30:00 +0000
Message-ID: <terms.20261117@example.com>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
""",
            """
Carol, please find the updated terms below. (Sent mail: recent mode returns it too.)
""",
        ),
        _mail(
            """
From: Dana Cole <dana@example.com>
To: grace@example.com
Cc: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <jurgen@xn--mller-kva.example>
Subject: Workshop agenda
Date: Wed, 18 Nov 2026 12:00:00 +0000
Message-ID: <agenda.20261118@example.com>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
""",
            """
Grace, Jurgen, the agenda for Thursday's workshop is final.
""",
        ),
        _mail(
            """
From: Conference Team <events@example.org>
To: dana@example.com
Subject: Your badge for the trade fair
Date: Thu, 19 Nov 2026 17:25:00 +0000
Message-ID: <badge.20261119@example.org>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
""",
            """
Your badge is ready for pick-up at the entrance.
""",
        ),
    ]


def sample_mailboxes() -> list[Mailbox]:
    """Fresh sample mailboxes (alice, bob, Gmail-style dana) for the demo server."""
    return [
        Mailbox("alice", "demo-alice", _alice()),
        Mailbox("bob", "demo-bob", _bob()),
        Mailbox(
            "dana@example.com",
            "demo-dana",
            _dana(),
            aliases=("recent:dana@example.com",),
        ),
    ]
